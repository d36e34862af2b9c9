"""Prompt files and prompt rendering.

A prompt file holds one record per prompt with a ``prompt`` (the question) and an ``answer`` (the
reference the reward function checks against); the field names are configurable. Two formats:

- JSON Lines (``.jsonl``, or ``.json`` holding JSON Lines): one JSON object per line; blank lines
  are skipped. Answers may be JSON numbers: they are kept as the text written in the file
  (``1.50`` gives ``"1.50"``, not ``"1.5"``). Other fields are ignored.
- Parquet (``.parquet``): one row per prompt, read with the ``datasets`` library.

Every problem is a :class:`PromptFileError` that names the file and the line (JSON Lines,
1-based, as an editor shows it) or the row (Parquet, 0-based): a malformed line, a line that is
not an object, a missing / empty / non-string prompt, a missing / null / empty answer, an empty
file, a missing column, an unknown extension, a missing file.

Why JSON Lines is parsed here and not by ``datasets``: the file has to be scanned line by line
anyway to name the offending line, and ``datasets`` (5.x) reads a column holding both strings and
numbers as a ``Json`` feature that decodes the strings again, which silently rewrites answers
(``"1.50"`` becomes ``1.5``, ``"[1, 2]"`` a list). The scan is the single source of truth.

``prompt_id`` is the 0-based index of the record in the file (blank lines do not count): a
stable id that rollout buffers and logs can refer to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "PromptFileError",
    "PromptRecord",
    "load_prompts",
    "render_prompt",
]

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line or row."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt; `location` (``file:line`` / ``file: row N (0-based)``, as in the loader's
    errors) lets a later check, e.g. of its length, name where it came from."""

    prompt_id: int
    prompt: str
    answer: str
    location: str = dataclasses.field(default="", compare=False)


def load_prompts(
    path: str | os.PathLike[str], *, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[PromptRecord]:
    """All records of a JSON Lines or Parquet prompt file, in file order.

    Raises:
        PromptFileError: the file is missing, has an unsupported extension, is empty, or a
            line / row is bad; the message starts with the file (``file:line:`` for JSON Lines,
            ``file: row N`` for Parquet).
    """
    for name, field in (("prompt_field", prompt_field), ("answer_field", answer_field)):
        if not isinstance(field, str) or not field:
            raise ValueError(f"{name} must be a non-empty string, got {field!r}")
    if prompt_field == answer_field:
        raise ValueError(f"prompt_field and answer_field must differ, both are {prompt_field!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise PromptFileError(
            f"{path}: unsupported prompt file extension {path.suffix!r}; supported: "
            f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} (.json files must hold JSON Lines)"
        )
    if not path.exists():
        raise PromptFileError(f"{path}: prompt file not found")
    if not path.is_file():
        raise PromptFileError(f"{path}: not a regular file")
    if suffix in JSONL_SUFFIXES:
        return _load_jsonl(path, prompt_field, answer_field)
    return _load_parquet(path, prompt_field, answer_field)


# --------------------------------------------------------------------------------- JSON Lines


class _JsonNumber(str):
    """A JSON number, kept as the text written in the file (tells numbers from strings)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_line(text: str) -> Any:
    return json.loads(
        text, parse_int=_JsonNumber, parse_float=_JsonNumber, parse_constant=_reject_constant
    )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, _JsonNumber):
        return f"a number ({value})"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _load_jsonl(path: Path, prompt_field: str, answer_field: str) -> list[PromptRecord]:
    records: list[PromptRecord] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if line_no == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark
            if not text.strip():
                continue
            try:
                obj = _parse_line(text.rstrip("\r\n"))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                hint = ""
                if text.strip() in ("[", "{"):
                    hint = (" (the file must hold one JSON object per line: JSON Lines, "
                            "not a pretty-printed JSON document)")
                raise PromptFileError(f"{where}: malformed JSON: {e}{hint}") from None
            if not isinstance(obj, dict):
                hint = ""
                if isinstance(obj, list):
                    hint = " (a top-level JSON array is not supported: write one object per line)"
                raise PromptFileError(f"{where}: expected a JSON object, got {_describe(obj)}{hint}")
            prompt = _check_prompt(obj, prompt_field, where)
            answer = _check_answer(obj, answer_field, where)
            records.append(PromptRecord(prompt_id=len(records), prompt=prompt, answer=answer, location=where))
    if not records:
        raise PromptFileError(f"{path}: empty prompt file (no records)")
    return records


def _check_prompt(obj: Mapping[str, Any], field: str, where: str) -> str:
    if field not in obj:
        raise PromptFileError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, str) or isinstance(value, _JsonNumber):
        raise PromptFileError(f"{where}: field {field!r} must be a string, got {_describe(value)}")
    if not value.strip():
        raise PromptFileError(f"{where}: field {field!r} is empty")
    return value


def _check_answer(obj: Mapping[str, Any], field: str, where: str) -> str:
    if field not in obj:
        raise PromptFileError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, str):
        raise PromptFileError(
            f"{where}: field {field!r} must be a string or a number, got {_describe(value)}"
        )
    value = str(value)  # a _JsonNumber becomes a plain str
    if not value.strip():
        raise PromptFileError(f"{where}: field {field!r} is empty")
    return value


# ------------------------------------------------------------------------------------ Parquet


def _load_parquet(path: Path, prompt_field: str, answer_field: str) -> list[PromptRecord]:
    import datasets  # heavy import: only when a Parquet file is read

    progress_was_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        # A private cache per call: concurrent ranks never share (or race on) a cache directory,
        # and nothing is left behind; the rows are copied into Python objects before it goes.
        with tempfile.TemporaryDirectory(prefix="rift-prompts-") as cache_dir:
            try:
                ds = datasets.load_dataset(
                    "parquet", data_files=str(path), split="train", cache_dir=cache_dir
                )
            except Exception as e:  # pyarrow / datasets errors on corrupt files have many types
                raise PromptFileError(f"{path}: cannot read Parquet file: {type(e).__name__}: {e}") from None
            columns = list(ds.column_names)
            for field in (prompt_field, answer_field):
                if field not in columns:
                    raise PromptFileError(f"{path}: missing column {field!r} (columns: {columns})")
            prompts = list(ds[prompt_field])
            answers = list(ds[answer_field])
            del ds
    finally:
        if progress_was_on:
            datasets.utils.enable_progress_bars()
    if not prompts:
        raise PromptFileError(f"{path}: empty prompt file (no rows)")
    records = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        where = f"{path}: row {row} (0-based)"
        if not isinstance(prompt, str):
            raise PromptFileError(f"{where}: column {prompt_field!r} must be a string, got {_describe_py(prompt)}")
        if not prompt.strip():
            raise PromptFileError(f"{where}: column {prompt_field!r} is empty")
        answer = _parquet_answer(answer, answer_field, where)
        records.append(PromptRecord(prompt_id=row, prompt=prompt, answer=answer, location=where))
    return records


def _describe_py(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} ({value!r})"


def _parquet_answer(value: Any, field: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PromptFileError(f"{where}: column {field!r} must be a string or a number, got {_describe_py(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptFileError(f"{where}: column {field!r} is {value}")
    text = str(value)
    if not text.strip():
        raise PromptFileError(f"{where}: column {field!r} is empty")
    return text


# ---------------------------------------------------------------------------------- rendering


def render_prompt(tokenizer: Any, prompt: str, *, chat_template: bool) -> list[int]:
    """The token ids the policy is prompted with.

    ``chat_template=True``: the prompt as one user turn through the tokenizer's chat template,
    with the generation prompt (the assistant header) appended; the template's own special tokens
    (e.g. BOS) are used, none are added on top. ``chat_template=False``: the plain text with the
    tokenizer's usual special tokens (``add_special_tokens=True``).

    Raises:
        ValueError: ``chat_template=True`` but the tokenizer has no chat template, or the
            rendering is empty (a sample needs at least one prompt token).
    """
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"chat_template=True but the tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) has no chat template; "
                "use a tokenizer that defines one (an instruct/chat model's) or set chat_template=False"
            )
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = _input_ids(out)
    else:
        ids = _input_ids(tokenizer(prompt, add_special_tokens=True))
    if not ids:
        raise ValueError(f"prompt {prompt[:60]!r} renders to no tokens (chat_template={chat_template})")
    return ids


def _input_ids(out: Any) -> list[int]:
    """Token ids from what a tokenizer returns: a dict / BatchEncoding (transformers 5 returns one
    from ``apply_chat_template(tokenize=True)``), a list of ids, or a batch of one such list."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):  # a tensor / array
        out = out.tolist()
    if isinstance(out, Sequence) and len(out) == 1 and isinstance(out[0], Sequence):
        out = out[0]  # a batch of one
    ids = [int(i) for i in out]
    return ids

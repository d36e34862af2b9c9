"""Offline rollout buffers: scored samples as Parquet plus a JSON manifest (the paper's setting).

    <out>/rollout.parquet   one row per sample: prompt_id, prompt, response, prompt_ids,
                            response_ids, behavior_logprobs, reward, correct
    <out>/manifest.json     model, sampling and reward settings, counts, accuracy, pass@k

`datasets.load_dataset("parquet", data_files=f"{out}/*.parquet")` reads the buffer; the trainer's
offline mode reads it with `load_buffer`, which checks it first: a buffer is input (written by an
earlier run, another tool, or edited by hand), and a NaN reward or a response with no tokens would
otherwise become a NaN loss or an index error steps into training. Every problem is one
:class:`BufferFileError` line naming the file, the column and, for a value, the row.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rift_megatron.rollout.rewards import pass_at_k

BUFFER_FILE = "rollout.parquet"
MANIFEST_FILE = "manifest.json"
COLUMNS = ("prompt_id", "prompt", "response", "prompt_ids", "response_ids", "behavior_logprobs", "reward", "correct")
# What each column must hold, as Arrow types: (description, test of the type)
_KINDS = {
    "integers": lambda t, pa: pa.types.is_integer(t),
    "strings": lambda t, pa: pa.types.is_string(t) or pa.types.is_large_string(t),
    "booleans": lambda t, pa: pa.types.is_boolean(t),
    "numbers": lambda t, pa: pa.types.is_integer(t) or pa.types.is_floating(t),
    "lists of integers": lambda t, pa: _is_list(t, pa) and pa.types.is_integer(t.value_type),
    "lists of numbers": lambda t, pa: _is_list(t, pa) and (pa.types.is_floating(t.value_type)
                                                           or pa.types.is_integer(t.value_type)),
}
COLUMN_KINDS = {"prompt_id": "integers", "prompt": "strings", "response": "strings", "prompt_ids": "lists of integers",
                "response_ids": "lists of integers", "behavior_logprobs": "lists of numbers", "reward": "numbers",
                "correct": "booleans"}


class BufferFileError(ValueError):
    """An offline buffer that cannot be trained on; the message names the file, column and row."""


def _is_list(arrow_type, pa) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


@dataclass(frozen=True)
class BufferRow:
    prompt_id: int
    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]
    reward: float
    correct: bool


def accuracy_summary(rows: Sequence[BufferRow], k: int) -> dict:
    """Sample accuracy, pass@1 and pass@k over prompts (unbiased estimator), mean length."""
    by_prompt: dict[int, list[bool]] = defaultdict(list)
    for row in rows:
        by_prompt[row.prompt_id].append(row.correct)
    prompts = len(by_prompt)
    correct = sum(row.correct for row in rows)
    return {
        "prompts": prompts,
        "samples": len(rows),
        "correct_samples": correct,
        "accuracy": correct / len(rows) if rows else 0.0,
        "pass@1": sum(pass_at_k(len(v), sum(v), 1) for v in by_prompt.values()) / prompts if prompts else 0.0,
        f"pass@{k}": sum(pass_at_k(len(v), sum(v), min(k, len(v))) for v in by_prompt.values()) / prompts if prompts else 0.0,
        "mean_response_tokens": sum(len(r.response_ids) for r in rows) / len(rows) if rows else 0.0,
    }


def write_buffer(directory: Path, rows: Sequence[BufferRow], manifest: dict) -> None:
    """Write the Parquet file and the manifest into `directory` (a staging dir: see staging.py)."""
    from datasets import Dataset

    columns = {name: [getattr(row, name) for row in rows] for name in COLUMNS}
    Dataset.from_dict(columns).to_parquet(str(directory / BUFFER_FILE))
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def load_buffer(directory: str | Path) -> list[BufferRow]:
    """Read a buffer back, checked: its columns and their types, then every row (no nulls, at least
    one prompt and one response token, one finite behaviour log-prob per response token, a finite
    reward). Raises BufferFileError (FileNotFoundError without the file), one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    path = directory / BUFFER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a rollout buffer (no {BUFFER_FILE})")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise BufferFileError(f"{path}: cannot read Parquet file: {type(error).__name__}: {error}") from None
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise BufferFileError(f"{path}: missing column(s) {missing} (columns: {table.column_names}); "
                              "write buffers with `rift rollout`")
    for name, kind in COLUMN_KINDS.items():
        arrow_type = table.schema.field(name).type
        if not _KINDS[kind](arrow_type, pa):
            raise BufferFileError(f"{path}: column {name!r} must hold {kind}, holds {arrow_type}")
    columns = {name: table[name].to_pylist() for name in COLUMNS}
    rows = []
    for index in range(table.num_rows):
        record = {name: columns[name][index] for name in COLUMNS}
        _check_row(record, f"{path}: row {index} (0-based)")
        rows.append(BufferRow(**record))
    return rows


def _check_row(record: dict, where: str) -> None:
    for name, value in record.items():
        if value is None or (isinstance(value, list) and any(item is None for item in value)):
            raise BufferFileError(f"{where}: column {name!r} holds a null")
    for name in ("prompt_ids", "response_ids"):
        if not record[name]:
            raise BufferFileError(f"{where}: column {name!r} is empty (a sample needs at least one token)")
    logprobs, tokens = len(record["behavior_logprobs"]), len(record["response_ids"])
    if logprobs != tokens:
        raise BufferFileError(f"{where}: column 'behavior_logprobs' has {logprobs} values for {tokens} tokens in "
                              "'response_ids' (one log-prob per response token)")
    if not math.isfinite(record["reward"]):
        raise BufferFileError(f"{where}: column 'reward' is {record['reward']} (rewards must be finite)")
    if not all(math.isfinite(value) for value in record["behavior_logprobs"]):
        raise BufferFileError(f"{where}: column 'behavior_logprobs' holds a non-finite value")

"""Prompt + response lengths against the model's context, checked before an engine starts.

Every prompt is sampled with up to ``max_tokens`` response tokens, so each prompt must fit in the
context minus ``max_tokens``. Left to vLLM, a violation fails inside the engine (after it was
built), naming neither the flag nor the prompt file and line, and recommending
VLLM_ALLOW_LONG_MAX_MODEL_LEN, which lets a model run past the positions it was trained on. Here
one :class:`LengthBudget` per command (`rift rollout`, `rift eval`, `rift train` for its rollouts
and its evaluations) is checked once, and every prompt is rendered through
:func:`render_within_budget`, so a refusal names the file and line and the flag or config key to
change.

The context is the model's positions (the smallest of the config.json keys vLLM reads, see
``CONTEXT_KEYS``), or an explicit engine length (``--max-model-len`` / ``rollout.max_model_len``),
which may not exceed them.

A prompt far too long is refused from its length in characters before it is tokenized (a 10 MB
prompt took 23 s and 2.5 GB to tokenize): a token covers at most as many characters as its
longest vocabulary entry has (byte-level and sentencepiece pieces spell what they cover; byte
fallback pieces like ``<0xE2>`` cover less than they spell), and normalisation (NFC/NFKC
composition) merges at most a few characters into one, allowed for by ``NORMALIZATION_SLACK``.
So a prompt longer than room x longest entry x slack characters cannot fit, whatever the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rift_megatron.data.prompts import PromptRecord, render_prompt

__all__ = ["CONTEXT_KEYS", "LengthBudget", "LengthError", "length_budget", "model_positions", "render_within_budget"]

# The config.json keys vLLM derives a model's maximum length from (it takes the smallest present).
CONTEXT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length", "max_seq_length",
    "seq_len", "model_max_length",
)
NORMALIZATION_SLACK = 4


class LengthError(ValueError):
    """A response length or prompt that does not fit the context; names the flag/key or file:line."""


@dataclass(frozen=True)
class LengthBudget:
    """`context` positions (set by `context_source`), of which a response takes up to
    `max_tokens` (set by `max_tokens_name`, a flag or config key)."""

    context: int
    context_source: str
    max_tokens: int
    max_tokens_name: str

    @property
    def prompt_room(self) -> int:
        """Tokens a prompt may have."""
        return self.context - self.max_tokens

    def describe(self) -> str:
        return f"with {self.max_tokens_name} {self.max_tokens}, of the context of {self.context} positions " \
               f"({self.context_source})"


def model_positions(folder: str | Path) -> tuple[int, str] | None:
    """(positions, "KEY in folder/config.json") for the smallest context key of the model's
    config.json; None if it has none (vLLM then picks its own default)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LengthError(f"{path}: cannot read the model's context length ({type(error).__name__}: {error})") from None
    found = [(value, key) for key in CONTEXT_KEYS
             if isinstance(value := config.get(key), int) and not isinstance(value, bool) and value > 0]
    if not found:
        return None
    positions, key = min(found)
    return positions, f"{key} in {path}"


def length_budget(
    folder: str | Path, max_tokens: int, max_tokens_name: str, *,
    max_model_len: int | None = None, max_model_len_name: str = "--max-model-len",
) -> LengthBudget | None:
    """The budget of the model in `folder`, checked: `max_model_len` (if given) within the
    model's positions, and `max_tokens` leaving room for a prompt. None when the context is
    unknown (no context key and no `max_model_len`).

    Raises:
        LengthError: naming `max_model_len_name` or `max_tokens_name` and where the limit comes from.
    """
    positions = model_positions(folder)
    if max_model_len is not None:
        if positions is not None and max_model_len > positions[0]:
            raise LengthError(
                f"{max_model_len_name} {max_model_len} exceeds the model's {positions[0]} positions ({positions[1]}): "
                f"positions past them were never trained; set {max_model_len_name} to at most {positions[0]}")
        context, source = max_model_len, max_model_len_name
    elif positions is None:
        return None
    else:
        context, source = positions
    if max_tokens >= context:
        raise LengthError(
            f"{max_tokens_name} {max_tokens} leaves no room for a prompt in the context of {context} positions "
            f"({source}): set {max_tokens_name} below {context}, to the longest response you need")
    return LengthBudget(context, source, max_tokens, max_tokens_name)


def _longest_token_chars(tokenizer: Any) -> int:
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def render_within_budget(
    tokenizer: Any, records: Sequence[PromptRecord], budget: LengthBudget | None, *, chat_template: bool
) -> list[list[int]]:
    """Every record's prompt token ids (``render_prompt``), each checked to leave the budget's
    `max_tokens` in its context; a prompt too long by its characters is refused untokenized.

    Raises:
        LengthError: ``FILE:LINE: ...`` (the record's location) naming the flag / key to change.
    """
    if budget is None:
        return [render_prompt(tokenizer, r.prompt, chat_template=chat_template) for r in records]
    room, char_limit = budget.prompt_room, None
    rendered = []
    for record in records:
        where = record.location or f"prompt {record.prompt_id}"
        if len(record.prompt) > room:  # may not fit: the cheap bound first
            char_limit = char_limit or room * _longest_token_chars(tokenizer) * NORMALIZATION_SLACK
            if len(record.prompt) > char_limit:
                raise LengthError(
                    f"{where}: the prompt has {len(record.prompt)} characters, more than any {room} tokens can spell "
                    f"(the room left {budget.describe()}): shorten it, or lower {budget.max_tokens_name}")
        ids = render_prompt(tokenizer, record.prompt, chat_template=chat_template)
        if len(ids) > room:
            raise LengthError(
                f"{where}: the prompt is {len(ids)} tokens, more than the {room} left {budget.describe()}: "
                f"shorten it, or lower {budget.max_tokens_name}")
        rendered.append(ids)
    return rendered

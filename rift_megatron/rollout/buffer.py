"""Offline rollout buffers: scored samples as Parquet plus a JSON manifest (the paper's setting).

    <out>/rollout.parquet   one row per sample: prompt_id, prompt, response, prompt_ids,
                            response_ids, behavior_logprobs, reward, correct
    <out>/manifest.json     model, sampling and reward settings, counts, accuracy, pass@k

`datasets.load_dataset("parquet", data_files=f"{out}/*.parquet")` reads the buffer; the trainer's
offline mode reads it with `load_buffer`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rift_megatron.rollout.rewards import pass_at_k

BUFFER_FILE = "rollout.parquet"
MANIFEST_FILE = "manifest.json"
COLUMNS = ("prompt_id", "prompt", "response", "prompt_ids", "response_ids", "behavior_logprobs", "reward", "correct")


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
    """Read a buffer back (errors name the directory and the missing piece)."""
    from datasets import load_dataset

    directory = Path(directory)
    path = directory / BUFFER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a rollout buffer (no {BUFFER_FILE})")
    table = load_dataset("parquet", data_files=str(path), split="train")
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    return [BufferRow(**{name: record[name] for name in COLUMNS}) for record in table]

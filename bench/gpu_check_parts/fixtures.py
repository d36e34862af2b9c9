"""What the GPU check's runs read, built in its work directory (nothing is downloaded): a
sentencepiece tokenizer, random-init Llama HF folders written with the project's own safetensors
writer, and scored rollout buffers in `rift rollout`'s format (seeded random tokens, no vLLM)."""

from __future__ import annotations

import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from .shapes import SEED, ModelShape, RunShape


def build_tokenizer(out_dir: Path) -> Path:
    """A 300-piece sentencepiece tokenizer. The trainer loads one from the model folder (for the
    pad id) and conversion copies it; its size does not have to match the model's vocabulary."""
    from rift_megatron.data.tokenizer import train_sentencepiece_tokenizer

    rng = random.Random(0)
    lines = [f"Question: What is {rng.randint(0, 999)} + {rng.randint(0, 999)}? The answer is \\boxed{{{i}}}."
             for i in range(2000)]
    return train_sentencepiece_tokenizer(lines, vocab_size=300, out_dir=out_dir)


def build_hf_model(hf_dir: Path, shape: ModelShape, dtype: str, tokenizer: Path) -> dict[str, Any]:
    """config.json + safetensors (1 GiB shards: the big model is sharded, with an index) of
    seeded normal(0, 0.02) weights, written one tensor at a time by the benchmark writer that
    uses the project's own safetensors writer and tensor table; plus the tokenizer files."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for convert_bench
    import torch
    from convert_bench import write_random_checkpoint

    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    info = write_random_checkpoint(hf_dir, shape.hf_config(torch_dtype), getattr(torch, torch_dtype), 2**30, SEED)
    for item in tokenizer.iterdir():
        shutil.copy(item, hf_dir / item.name)
    return {"shape": shape.name, "dtype": dtype, "num_parameters": info["num_parameters"],
            "model_bytes": info["model_bytes"], "num_shards": info["num_shards"],
            "generate_seconds": round(info["generate_seconds"], 2)}


def build_buffer(out_dir: Path, shape: ModelShape, run: RunShape, seed: int) -> dict[str, Any]:
    """A scored buffer in `rift rollout`'s format, without vLLM: `steps x global_batch` samples of
    seeded random token ids (ids 4.. : the tokenizer's specials stay out), alternating rewards
    +1 / -0.2 (both branches of the RIFT loss), and behaviour log-probs near a uniform
    distribution's -ln(vocab), which a random-init model also gives (importance ratios ~1, as
    right after a real rollout)."""
    from rift_megatron.rollout.buffer import BufferRow, write_buffer

    rng = random.Random(seed)
    uniform = -math.log(shape.vocab)
    rows = []
    for index in range(run.steps * run.global_batch):
        correct = index % 2 == 0
        rows.append(BufferRow(
            prompt_id=index // 2, prompt=f"prompt {index // 2}", response=f"response {index}",
            prompt_ids=[rng.randrange(4, shape.vocab) for _ in range(run.prompt_len)],
            response_ids=[rng.randrange(4, shape.vocab) for _ in range(run.response_len)],
            behavior_logprobs=[min(uniform + rng.gauss(0.0, 0.05), -1e-3) for _ in range(run.response_len)],
            reward=1.0 if correct else -0.2, correct=correct))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_buffer(out_dir, rows, {"source": "bench/gpu_check.py", "seed": seed, "samples": len(rows)})
    return {"samples": len(rows), "seq_len": run.seq_len}

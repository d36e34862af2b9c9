"""The GPU check's `kernel_options` probe, run as its own process: the platform's option table
(models/performance.py) applied for real, and the same two fp32 training steps with it, with every
fusion off, and with selective / full activation recomputation, from the same seeded weights.

On a GPU this is where the fused kernels (torch.compile'd SwiGLU and bias-dropout-add; TE's RoPE,
when TE is installed), the DDP overlap and recomputation first run: the check fails unless every
variant matches the unfused run within the GPU-vs-CPU parity tolerance. On the CPU every variant
has the same (unfused) table and only recomputation differs (tests/unit/test_gpu_check.py runs it
there, so the probe itself is exercised in CI).

    python bench/gpu_check_parts/kernel_probe.py --out probe.json [--model parity|tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: its package is bench/gpu_check_parts
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 2
SEED = 1234


def variants() -> dict[str, tuple[bool, Any]]:
    """name: (fusions as the platform's table has them, recompute)."""
    from rift_megatron.models.provider import RecomputeConfig

    return {"unfused": (False, RecomputeConfig()), "platform": (True, RecomputeConfig()),
            "selective": (True, RecomputeConfig("selective")), "full": (True, RecomputeConfig("full", "uniform", 1))}


def run_variant(arch, fused: bool, recompute) -> dict[str, Any]:
    from rift_megatron.loss import LossSettings
    from rift_megatron.models.provider import GPTModelProvider
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_model_parallel
    from rift_megatron.training.setup import OptimConfig, train_state
    from rift_megatron.training.step import train_step
    from tests.synthetic_batch import mixed_reward_batch

    init_model_parallel(ParallelLayout(), seed=SEED)
    try:
        provider = GPTModelProvider(arch, ParallelLayout(), recompute=recompute)
        if not fused:
            provider = provider.with_options(provider.options.without_fusions())
        state = train_state(provider, OptimConfig(lr=1e-3), total_steps=STEPS)
        batch = mixed_reward_batch(seed=SEED, seq_len=64, vocab_size=arch.vocab_size)
        metrics = [train_step(state, batch, LossSettings(), micro_batch_size=4) for _ in range(STEPS)]
        applied = {name: getattr(provider.config, name) for name in provider.options.transformer_config_fields()}
        return {"options": dataclasses.asdict(provider.options), "config_fields": applied,
                "recompute_granularity": provider.config.recompute_granularity, "metrics": metrics}
    finally:
        destroy_model_parallel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", choices=("parity", "tiny"), default="parity")
    args = parser.parse_args(argv)

    import torch

    from gpu_check_parts.shapes import PARITY
    from rift_megatron.models import parse_hf_config
    from rift_megatron.models.presets import tiny_hf_config
    from rift_megatron.parallel import init_distributed

    platform = init_distributed()
    arch = parse_hf_config(PARITY.hf_config("float32") if args.model == "parity" else tiny_hf_config())
    report = {"platform": platform.kind, "device": torch.cuda.get_device_name() if platform.is_cuda else "cpu",
              "variants": {name: run_variant(arch, fused, recompute) for name, (fused, recompute) in variants().items()}}
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A short RIFT training run on a tiny model and a fixed synthetic batch (no data, no download).

This is the README's first command until the full demo exists, and the fixture of the
"loss goes down" tests: the same Megatron set-up and step as real training, at toy size.
"""

from __future__ import annotations

from collections.abc import Callable

from rift_megatron.loss import LossSettings
from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.batch import shard_for_data_parallel
from rift_megatron.training.setup import OptimConfig, setup_training
from rift_megatron.training.step import train_step
from rift_megatron.training.synthetic import mixed_reward_batch


def run_synthetic_training(
    steps: int = 30,
    settings: LossSettings = LossSettings(),
    lr: float = 1e-3,
    layout: ParallelLayout = ParallelLayout(),
    micro_batch_size: int = 2,
    seed: int = 0,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `steps` optimizer steps on one fixed mixed-reward batch; return per-step metrics."""
    from megatron.core import parallel_state as ps

    init_distributed()
    init_model_parallel(layout, seed=seed)
    try:
        arch = parse_hf_config(tiny_hf_config(), source="built-in tiny Llama config")
        state = setup_training(arch, layout, OptimConfig(lr=lr), total_steps=steps)
        batch = mixed_reward_batch(seed=seed, vocab_size=arch.vocab_size)
        shard = shard_for_data_parallel(
            batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        )
        history = []
        for _ in range(steps):
            metrics = train_step(state, shard, settings, micro_batch_size)
            history.append(metrics)
            if on_step is not None:
                on_step(metrics)
        return history
    finally:
        destroy_model_parallel()

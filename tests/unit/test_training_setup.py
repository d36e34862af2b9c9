"""Optimizer / LR-schedule set-up: validation at the boundary, and the schedule really applied."""

from __future__ import annotations

import math

import pytest

from rift_megatron.loss import LossSettings
from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.batch import shard_for_data_parallel, split_micro_batches
from rift_megatron.training.setup import OptimConfig, setup_training
from rift_megatron.training.step import train_step
from tests.synthetic_batch import mixed_reward_batch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "optim.lr must be > 0"),
        ({"lr": 1e-3, "min_lr": 1e-2}, "optim.min_lr must be in [0, lr=0.001]"),
        ({"lr_decay_style": "exponential"}, "optim.lr_decay_style must be one of"),
        ({"clip_grad": -1.0}, "optim.clip_grad must be >= 0"),
    ],
)
def test_optim_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        OptimConfig(**kwargs)


def test_batch_split_errors_name_the_numbers():
    batch = mixed_reward_batch()
    with pytest.raises(ValueError, match="8 samples per data-parallel rank do not split into micro-batches of 3"):
        split_micro_batches(batch, 3)
    with pytest.raises(ValueError, match="global batch of 8 samples does not split over 3 data-parallel ranks"):
        shard_for_data_parallel(batch, 0, 3)
    broken = dict(batch, rewards=batch["rewards"][:4])
    with pytest.raises(ValueError, match=r"batch\['rewards'\] has shape \[4\], expected \[8\]"):
        split_micro_batches(broken, 2)
    with pytest.raises(ValueError, match="missing key"):
        split_micro_batches({"tokens": batch["tokens"]}, 2)


def test_warmup_then_cosine_decay_is_applied_per_optimizer_step():
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        optim = OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=6, lr_decay_style="cosine")
        state = setup_training(parse_hf_config(tiny_hf_config()), ParallelLayout(), optim, total_steps=6)
        batch = mixed_reward_batch()
        seen = [train_step(state, batch, LossSettings(), micro_batch_size=4)["lr"] for _ in range(6)]
    finally:
        destroy_model_parallel()
    # The LR reported after step k is the one the scheduler set for step k+1 (Megatron semantics).
    def expected(step: int) -> float:
        if step <= 2:
            return 1e-3 * step / 2
        progress = (step - 2) / (6 - 2)
        return 1e-4 + (1e-3 - 1e-4) * 0.5 * (math.cos(math.pi * progress) + 1)

    assert seen == pytest.approx([expected(step) for step in range(1, 7)], rel=1e-6)


def test_building_layout_after_layout_leaves_no_process_groups_behind():
    """Megatron creates ~20 process groups per layout and its teardown only forgets them; each gloo
    group keeps a TCP loop thread. A test session builds hundreds of layouts: ours destroys the
    groups Megatron created, so neither groups nor threads pile up (they did: ~50 threads a layout,
    3466 in one test session, whose wake-ups kept a core busy)."""
    import os

    import torch.distributed as dist

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)  # the first layout may start threads that stay
    destroy_model_parallel()
    groups, started = set(dist.distributed_c10d._world.pg_map), threads()
    for _ in range(3):
        init_model_parallel(ParallelLayout(), seed=0)
        assert len(dist.distributed_c10d._world.pg_map) > len(groups)  # Megatron's groups exist meanwhile
        destroy_model_parallel()
    assert set(dist.distributed_c10d._world.pg_map) == groups
    assert threads() <= started + 5, (started, threads())

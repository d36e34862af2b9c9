"""A tiny model trained on a fixed mixed-reward batch: RIFT learns, naive runs away.

Real Megatron-Core (TP1, single gloo process), real optimizer, 30 Adam steps at lr 1e-3 on the
synthetic batch with rewards (+1, -0.2, 0, +1, -1, +0.5, -0.2, +1): the same set-up and step as
real training, at toy size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rift_megatron.loss import LossSettings
from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.setup import OptimConfig, setup_training
from rift_megatron.training.step import train_step
from tests.synthetic_batch import mixed_reward_batch

STEPS = 30


def run_synthetic_training(steps: int, settings: LossSettings, lr: float = 1e-3) -> list[dict[str, float]]:
    """Train `steps` optimizer steps (TP1, one process) on one fixed mixed-reward batch."""
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        arch = parse_hf_config(tiny_hf_config(), source="built-in tiny Llama config")
        state = setup_training(arch, ParallelLayout(), OptimConfig(lr=lr), total_steps=steps)
        batch = mixed_reward_batch(seed=0, vocab_size=arch.vocab_size)
        return [train_step(state, batch, settings, micro_batch_size=2) for _ in range(steps)]
    finally:
        destroy_model_parallel()


@pytest.fixture(scope="module")
def rift_history():
    return run_synthetic_training(steps=STEPS, settings=LossSettings(algorithm="rift"))


@pytest.fixture(scope="module")
def naive_history():
    return run_synthetic_training(steps=STEPS, settings=LossSettings(algorithm="naive"))


def test_rift_loss_goes_down_and_stays_non_negative(rift_history):
    losses = [m["loss"] for m in rift_history]
    assert all(loss >= 0 for loss in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(m["skipped"] == 0 for m in rift_history)


def test_rift_raises_positive_and_lowers_negative_logprobs(rift_history):
    first, last = rift_history[0], rift_history[-1]
    assert last["logprob_mean_pos"] > first["logprob_mean_pos"] + 2.0
    assert last["logprob_mean_neg"] < first["logprob_mean_neg"] - 1.0
    # The negative branch's weight (the ratio) shrinks as negatives are suppressed: bounded push.
    assert last["ratio_mean_neg"] < 0.1 * first["ratio_mean_neg"]


def test_naive_loss_goes_below_zero_without_bound(naive_history, rift_history):
    losses = [m["loss"] for m in naive_history]
    assert losses[-1] < -2.0
    tail = losses[-10:]
    assert all(b < a for a, b in zip(tail, tail[1:])), tail  # still falling when we stop
    # Its negative part dominates and keeps growing in magnitude, unlike RIFT's which vanishes.
    assert naive_history[-1]["loss_neg"] < naive_history[-10]["loss_neg"] < 0
    assert rift_history[-1]["loss_neg"] >= 0


def test_step_without_loss_tokens_is_skipped_and_leaves_weights_alone():
    from megatron.core.utils import unwrap_model

    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        state = setup_training(parse_hf_config(tiny_hf_config()), ParallelLayout(), OptimConfig(lr=1e-2))
        before = {k: v.clone() for k, v in unwrap_model(state.model)[0].state_dict().items() if torch.is_tensor(v)}
        batch = mixed_reward_batch(rewards=(0.0,) * 8)
        metrics = train_step(state, batch, LossSettings(), micro_batch_size=4)
        after = unwrap_model(state.model)[0].state_dict()
        assert metrics["skipped"] == 1.0 and metrics["tokens"] == 0 and metrics["loss"] == 0.0
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        destroy_model_parallel()


def test_rift_cli_reports_version_and_help():
    rift = Path(sys.executable).with_name("rift")
    assert rift.exists(), "the `rift` console script is not installed (run scripts/install.sh)"
    version = subprocess.run([str(rift), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("rift-megatron ")
    help_text = subprocess.run([str(rift), "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in help_text and "usage: rift" in help_text

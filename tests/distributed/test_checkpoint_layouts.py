"""A training checkpoint saved at TP2 resumes at TP1 x DP2 and at PP2 as if never interrupted
(issue 15: the optimizer state must reshard across tensor and pipeline layouts, not only DP).

One torchrun world of 2 gloo processes (`checkpoint_worker.py`): TP2 trains step 1 from shared
initial weights, saves (in the background, fully parallel, optimizer `fully_reshardable`), and
trains steps 2 and 3 while the checkpoint is written: the uninterrupted run. A freshly seeded
model at TP1 x DP2 and at PP2 loads it and trains steps 2 and 3. Step 2's loss checks the
weights, step 3's the Adam state (moments and step count), the LR schedule included: both must
match the uninterrupted run to 1e-5 relative (fp32; the layouts sum in different orders, measured
identical here; a wrong shard, lost moments or a restarted Adam step move step 3 by ~2e-2,
which the weights-only control shows). The same for the non-distributed optimizer at PP2.

Also: fully parallel load gives every rank exactly the tensors a plain load gives; fully
parallel and plain saves store identical tensors, the former spread over both ranks' files; a
dp_reshardable checkpoint is refused at another layout in one line naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import run_torchrun
from tests.stored_checkpoint import stored_tensors

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("checkpoint_worker.py")
RTOL = 1e-5  # same value and reasoning as test_parallel_equivalence's per-step tolerance


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("checkpoint_layouts")
    run_torchrun(WORKER, 2, {"work_dir": str(work)}, work, timeout=900)
    return {**json.loads((work / "result.json").read_text()), "work": work}


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b))


def test_the_background_save_completed_while_training_went_on(result) -> None:
    assert result["pending_after_save"] == 1 and result["pending_after_wait"] == 0
    directory = result["work"] / "tp2"
    assert (directory / "latest").read_text().strip() == "iter_0000001"
    assert (directory / "iter_0000001" / "metadata.json").is_file()
    assert not list(directory.glob(".*partial*"))


@pytest.mark.parametrize("resumed", ["resume_tp1dp2", "resume_pp2"])
def test_a_tp2_checkpoint_resumes_at_another_layout_with_the_same_losses(result, resumed: str) -> None:
    reference = result["reference"]
    assert len(reference) == 3 and len(set(reference)) == 3  # every step moves the loss
    assert _close(result[resumed], reference[1:]), (resumed, result[resumed], reference)


def test_the_non_distributed_optimizer_resumes_at_another_layout_too(result) -> None:
    assert _close(result["resume_pp2_plain"], result["reference_plain"][1:]), result


def test_the_comparison_sees_the_optimizer_state(result) -> None:
    """Weights alone (a fresh Adam) give step 2 right and step 3 wrong: step 3 tests the moments."""
    weights_only, reference = result["weights_only_pp2"], result["reference"]
    assert _close(weights_only[:1], reference[1:2])
    assert abs(weights_only[1] - reference[2]) > 100 * RTOL * abs(reference[2]), (weights_only, reference)


def test_fully_parallel_load_gives_the_same_state_as_a_plain_load(result) -> None:
    assert result["fully_parallel_load_differences"] == {"0": [], "1": []}
    assert min(result["fully_parallel_load_compared"].values()) > 20  # model, main params, Adam moments


def test_fully_parallel_save_stores_the_same_tensors_spread_over_the_ranks(result) -> None:
    parallel = result["work"] / "dp2_parallel_save" / "iter_0000001"
    serial = result["work"] / "dp2_serial_save" / "iter_0000001"
    a, b = stored_tensors(parallel, optimizer=True), stored_tensors(serial, optimizer=True)
    assert a.keys() == b.keys() and any(key.startswith("optimizer.") for key in a)
    assert [key for key in a if not torch.equal(a[key], b[key])] == []

    def bytes_by_rank(checkpoint: Path) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for file in checkpoint.glob("__*_*.distcp"):
            rank = file.name.split("_")[2]
            sizes[rank] = sizes.get(rank, 0) + file.stat().st_size
        return sizes

    spread, alone = bytes_by_rank(parallel), bytes_by_rank(serial)
    assert alone.get("1", 0) < 0.01 * alone["0"], alone  # replicated data: data-parallel rank 0 writes it
    assert min(spread.values()) > 0.4 * sum(spread.values()), spread


def test_a_dp_reshardable_checkpoint_is_refused_at_another_layout(result) -> None:
    message = result["dp_reshardable_at_pp2"]
    assert "checkpoint.optimizer_format=dp_reshardable at TP2 PP1" in message and "this run: TP1 PP2" in message
    assert "\n" not in message

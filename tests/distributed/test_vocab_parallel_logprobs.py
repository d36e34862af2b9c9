"""Vocab-parallel log-probs and the RIFT loss_func over real gloo process groups (docs/objective.md
properties 4 and 5): TP2 (world 2), TP4 and DP2 x TP2 (world 4) against the TP1 computation, and
the loss at context parallelism 2 (world 2) against CP1: fp64 to 1e-10, fp32 to 1e-6.

Two launches in total (world 2 and world 4, module-scoped fixtures); workers save their results
to files and every assertion runs here. Tolerances: fp32 log-probs, losses and gradients
rtol=1e-6 / atol=1e-6 (all-reduce summation order is the only difference from TP1); bf16
gradients rtol=2**-7 (one bf16 rounding step of an fp32 value that differs in the last bits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rift_megatron.loss import count_sign_tokens, make_loss_func, reduce_loss_reports, vocab_parallel_logprobs
from tests.distributed import vp_logprobs_worker as worker

pytestmark = pytest.mark.distributed

FP32_TOL = dict(rtol=1e-6, atol=1e-6)
BF16_GRAD_TOL = dict(rtol=2**-7, atol=1e-6)


def _launch(world_size: int, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"gloo_ws{world_size}")
    # File rendezvous: no port to pick, so no race with other jobs on the machine.
    mp.spawn(worker.run, args=(world_size, str(out / "rendezvous"), str(out)), nprocs=world_size, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _launch(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _launch(4, tmp_path_factory)


def _layouts(world2, world4):
    """(tp size, [(tp rank, rank results)]) for TP2 in world 2, TP4 and both TP2 groups of world 4."""
    yield 2, list(enumerate(world2))
    yield 4, list(enumerate(world4))
    yield 2, [(0, world4[0]), (1, world4[1])]
    yield 2, [(0, world4[2]), (1, world4[3])]


def _tp1_logprobs(vocab: int, tp: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets, grad_out = worker.make_logits_case(vocab, tp, dtype)
    leaf = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(leaf, targets, vocab_size=vocab)
    lp.backward(grad_out)
    # and an independent float64 check of the TP1 values themselves
    ref = torch.log_softmax(logits[..., :vocab].double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    return lp.detach(), leaf.grad


def _slice(t: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    n = t.shape[-1] // tp
    return t[..., tp_rank * n:(tp_rank + 1) * n]


def test_tensor_parallel_logprobs_and_grad_slices_equal_tp1(world2, world4):
    checked = 0
    for tp, members in _layouts(world2, world4):
        for vocab in worker.VOCAB_SIZES:
            for dtype in worker.DTYPES:
                key = f"tp{tp}/v{vocab}/{str(dtype).split('.')[-1]}"
                lp1, grad1 = _tp1_logprobs(vocab, tp, dtype)
                grad_tol = FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL
                for tp_rank, res in members:
                    assert res[f"logprobs/{key}"].dtype == torch.float32
                    torch.testing.assert_close(res[f"logprobs/{key}"], lp1, **FP32_TOL)
                    assert torch.equal(res[f"logprobs/{key}"], members[0][1][f"logprobs/{key}"])  # same on all ranks
                    grad = res[f"grad/{key}"]
                    assert grad.dtype == dtype
                    torch.testing.assert_close(grad.float(), _slice(grad1, tp, tp_rank).float(), **grad_tol)
                    assert res[f"input_unchanged/{key}"]
                    assert res[f"inplace_identical/{key}"]  # values and gradient slice, bit for bit
                    checked += 1
    assert checked == (2 + 4 + 2 + 2) * len(worker.VOCAB_SIZES) * len(worker.DTYPES)


def test_padding_only_rank_gets_zero_gradient(world4):
    """At TP4 with vocab 9 (padded to 12) rank 3 holds only padding columns set to 1e4."""
    for dtype in worker.DTYPES:
        grad = world4[3][f"grad/tp4/v9/{str(dtype).split('.')[-1]}"]
        assert grad.shape[-1] == 3
        assert torch.equal(grad, torch.zeros_like(grad))


def test_no_vocabulary_gather_only_two_small_all_reduces(world2, world4):
    n_tokens = worker.BATCH * worker.STEPS
    for results in (world2, world4):
        for res in results:
            for key, spy in ((k, v) for k, v in res.items() if k.startswith("spy/")):
                # the spy saw the real collectives (so it would also have seen a gather)...
                assert spy["calls"] == {"all_reduce": 2}, (key, spy)
                # ...and they carry O(batch * seq) numbers, never a vocabulary dimension
                assert spy["max_all_reduce_numel"] <= 2 * n_tokens, (key, spy)
            assert not any(res["spy_total"].get(name, 0) for name in worker.GATHER_LIKE), res["spy_total"]
            assert res["spy_total"]["all_reduce"] > 0


def _tp1_loss(settings):
    return _one_call_loss(*worker.make_loss_case(1), settings)


def _one_call_loss(logits, batch, settings):
    """The whole batch in one loss_func call: (loss_sum, num_tokens, logit gradient, metrics)."""
    counts = None
    if settings.normalization == "per_sign":
        counts = count_sign_tokens(batch["rewards"], batch["loss_mask"], algorithm=settings.algorithm)
    leaf = logits.clone().requires_grad_()
    loss_sum, num_tokens, report = make_loss_func(batch, settings, vocab_size=worker.LOSS_VOCAB,
                                                  sign_token_counts=counts)(leaf)
    (loss_sum / num_tokens).backward()
    return loss_sum.detach(), num_tokens, leaf.grad, reduce_loss_reports([report])


def test_loss_func_at_tensor_parallel_equals_tp1(world2, world4):
    for tp, members in _layouts(world2, world4):
        for i, settings in enumerate(worker.LOSS_SETTINGS):
            loss1, tokens1, grad1, metrics1 = _tp1_loss(settings)
            assert grad1[..., : worker.LOSS_VOCAB].abs().sum() > 0
            for tp_rank, res in members:
                key = f"tp{tp}/s{i}"
                torch.testing.assert_close(res[f"loss_sum/{key}"], loss1, **FP32_TOL)
                assert int(res[f"num_tokens/{key}"]) == int(tokens1)
                # TP1 logits are padded to 11 columns, TP2/TP4 to 12: compare the real columns
                grad = res[f"loss_grad/{key}"]
                full_cols = torch.arange(tp_rank * grad.shape[-1], (tp_rank + 1) * grad.shape[-1])
                real = full_cols < worker.LOSS_VOCAB
                torch.testing.assert_close(grad[..., real], grad1[..., full_cols[real]], **FP32_TOL)
                assert torch.equal(grad[..., ~real], torch.zeros_like(grad[..., ~real]))
                for name, value in metrics1.items():
                    assert res[f"metrics/{key}"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, name)


def test_data_parallel_times_tensor_parallel_equals_tp1_full_batch(world4):
    """DP2 x TP2 with two micro-batches per DP rank: same global loss, gradients and metrics."""
    for i, settings in enumerate(worker.LOSS_SETTINGS):
        loss1, tokens1, grad1, metrics1 = _tp1_loss(settings)
        key = f"dp2tp2/s{i}"
        for rank, res in enumerate(world4):
            tp_rank = rank % 2
            torch.testing.assert_close(res[f"loss/{key}"], loss1 / tokens1, **FP32_TOL)
            grad = res[f"loss_grad/{key}"]
            cols = torch.arange(tp_rank * grad.shape[-1], (tp_rank + 1) * grad.shape[-1])
            real = cols < worker.LOSS_VOCAB
            expected = grad1[res[f"rows/{key}"]][..., cols[real]]
            torch.testing.assert_close(grad[..., real], expected, **FP32_TOL)
            for name, value in metrics1.items():
                assert res[f"metrics/{key}"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, name)


CP_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: FP32_TOL}


def test_context_parallel_split_is_megatrons(world2):
    """`init_model_parallel` gives Megatron's CP2 groups; our split (computed without a group)
    equals megatron.core.utils.get_batch_on_this_cp_rank's over that CP group, and the two ranks'
    positions cover the padded sequence once."""
    assert [res["cp/sizes"] for res in world2] == [(2, 1, 2)] * 2  # CP, DP, DP x CP
    for dtype in worker.CP_DTYPES:
        name = str(dtype).split(".")[-1]
        assert all(res[f"cp/same_split_as_megatron/{name}"] for res in world2)
        assert sorted(torch.cat([res[f"cp/positions/{name}"] for res in world2]).tolist()) == list(range(8))


def test_context_parallel_loss_and_logit_gradient_equal_cp1(world2):
    """Token and sequence granularity x global and per_sign: the loss, its gradient w.r.t. the
    logits (the ranks' slices put back by position) and the step metrics equal CP1; the padding's
    garbage logits get zero gradient; and without the CP reduction the sequence loss is wrong (the
    check can fail)."""
    for dtype in worker.CP_DTYPES:
        name, tol = str(dtype).split(".")[-1], CP_TOL[dtype]
        for i, settings in enumerate(worker.CP_SETTINGS):
            loss_sum, num_tokens, grad, metrics = _one_call_loss(*worker.make_cp_case(dtype), settings)  # CP1
            loss = loss_sum / num_tokens
            key = f"{name}/s{i}"
            full_grad = torch.zeros(grad.shape[0], 8, grad.shape[2], dtype=grad.dtype)
            for res in world2:
                torch.testing.assert_close(res[f"cp/loss/{key}"], loss, **tol)
                assert res[f"cp/grad/{key}"].dtype == dtype
                full_grad[:, res[f"cp/positions/{name}"]] = res[f"cp/grad/{key}"]
                got = res[f"cp/metrics/{key}"]
                assert got.keys() == metrics.keys()
                for metric, value in metrics.items():
                    assert got[metric] == pytest.approx(value, rel=tol["rtol"], abs=tol["atol"]), (key, metric)
            assert float(grad.abs().sum()) > 0
            torch.testing.assert_close(full_grad[:, :6], grad, **tol)
            assert not full_grad[:, 6:].any()
            if settings.granularity == "sequence":
                wrong = world2[0][f"cp/loss_without_cp_reduction/{key}"]
                assert abs(float(wrong - loss)) > 1e-4, (key, float(wrong), float(loss))  # >> the tolerances

"""The in-place log-prob path the trainer uses (issue 15, docs/objective.md property 5).

`train_step` builds its loss with `consume_logits=True`, so `vocab_parallel_logprobs` works in the
model output's own fp32 buffer (Float16Module's upcast) instead of a copy. Checked here:

* values and gradients equal the copying path's bit for bit (same arithmetic, rtol=atol=0) and an
  independent float64 reference (tests/unit/loss_reference.py) within the tolerances test_loss.py
  uses for each dtype, with TP padding columns present;
* no second logits-sized fp32 buffer: the CPU allocator's own accounting
  (`bench/loss_bench.py`'s `allocation_trace`, the benchmark's memory measurement) counts the
  logits-sized allocations and the peak; the copying path is measured the same way as a control
  that must show the extra buffer, so the measurement cannot pass by seeing nothing;
* `inplace=True` refuses a parameter (a leaf that requires grad) or a view of one;
* real bf16 `train_step`s (Float16Module's upcast reaching the loss) give the same metrics with the
  in-place loss as with the copying one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.module import float16_to_fp32

from rift_megatron.loss import LossSettings, make_loss_func, vocab_parallel_logprobs
from tests.unit.loss_reference import reference_logprobs
from tests.unit.test_loss import F32_TOL, F64_TOL, batch_vocab, make_loss_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from loss_bench import allocation_trace  # noqa: E402

# the fp32 gradient rounded once to the model output's dtype (as in test_loss.py)
GRAD_TOL = {torch.float64: F64_TOL, torch.float32: F32_TOL, torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}
VOCAB, PADDED = 13, 16


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model output [3, 5, 16] (3 padding columns at 1e4: a leak would be obvious), targets, grad_out."""
    g = torch.Generator().manual_seed(11)
    output = 4.0 * torch.randn(3, 5, PADDED, generator=g, dtype=torch.float64)
    output[..., VOCAB:] = 1e4
    targets = torch.randint(0, VOCAB, (3, 5), generator=g)
    targets[0, 0] = VOCAB - 1
    return output.to(dtype), targets, torch.randn(3, 5, generator=g)


def _logits(output: torch.Tensor) -> torch.Tensor:
    """The loss's input as the trainer gets it: Float16Module's fp32 upcast of a half-precision
    output, else the output itself through one op (a fresh non-leaf tensor, like a matmul's)."""
    return float16_to_fp32(output) if output.dtype == torch.bfloat16 else output * 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_inplace_logprobs_equal_copying_path_and_float64_reference(dtype):
    output, targets, grad_out = _case(dtype)
    runs = {}
    for inplace in (False, True):
        leaf = output.clone().requires_grad_()
        logits = _logits(leaf)
        lp = vocab_parallel_logprobs(logits, targets, vocab_size=VOCAB, inplace=inplace)
        lp.backward(grad_out.to(lp.dtype))
        runs[inplace] = (lp.detach(), leaf.grad, logits.detach())
    (lp_copy, grad_copy, kept), (lp_inplace, grad_inplace, consumed) = runs[False], runs[True]
    torch.testing.assert_close(lp_inplace, lp_copy, rtol=0, atol=0)
    torch.testing.assert_close(grad_inplace, grad_copy, rtol=0, atol=0)
    assert torch.equal(kept, _logits(output))  # the copying path left its input alone...
    assert not torch.equal(consumed, _logits(output))  # ...the in-place one worked in it

    rows = output.double().reshape(-1, PADDED).tolist()
    ref, ref_dlogits = reference_logprobs(rows, targets.reshape(-1).tolist(), VOCAB)
    torch.testing.assert_close(lp_inplace.double(), torch.tensor(ref, dtype=torch.float64).reshape(3, 5),
                               **(F64_TOL if dtype == torch.float64 else F32_TOL))
    expected = torch.tensor(ref_dlogits, dtype=torch.float64).reshape(3, 5, PADDED) * grad_out.double()[..., None]
    assert grad_inplace.dtype == dtype
    torch.testing.assert_close(grad_inplace.double(), expected.to(dtype).double(), **GRAD_TOL[dtype])
    assert torch.equal(grad_inplace[..., VOCAB:], torch.zeros_like(grad_inplace[..., VOCAB:]))


def test_inplace_on_half_precision_logits_converts_and_leaves_them_alone():
    output, targets, _ = _case(torch.bfloat16)
    before = output.clone()
    with torch.no_grad():
        lp = vocab_parallel_logprobs(output, targets, vocab_size=VOCAB, inplace=True)
    assert torch.equal(output, before)
    torch.testing.assert_close(lp, vocab_parallel_logprobs(before, targets, vocab_size=VOCAB), rtol=0, atol=0)


def test_training_loss_consuming_logits_equals_copying_loss():
    """`make_loss_func(consume_logits=True)`, as train_step uses it, on the bf16 chain."""
    logits, batch = make_loss_batch()
    output = logits.to(torch.bfloat16)
    settings = LossSettings(ratio_cap=1.3)
    runs = {}
    for consume in (False, True):
        leaf = output.clone().requires_grad_()
        loss_sum, num_tokens, report = make_loss_func(batch, settings, vocab_size=batch_vocab(logits),
                                                      consume_logits=consume)(float16_to_fp32(leaf))
        (loss_sum / num_tokens).backward()
        runs[consume] = (loss_sum.detach(), num_tokens, report, leaf.grad)
    (loss_a, tokens_a, report_a, grad_a), (loss_b, tokens_b, report_b, grad_b) = runs[False], runs[True]
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert int(tokens_a) == int(tokens_b) > 0
    assert report_a.keys() == report_b.keys()
    for key in report_a:
        torch.testing.assert_close(report_b[key], report_a[key], rtol=0, atol=0)
    torch.testing.assert_close(grad_b, grad_a, rtol=0, atol=0)
    assert grad_b.abs().sum() > 0


def _bf16_chain(consume: bool, output: torch.Tensor, batch: dict, vocab: int):
    """Upcast, training loss, backward to the bf16 output: what one micro-batch's loss costs."""
    loss_func = make_loss_func(batch, LossSettings(), vocab_size=vocab, consume_logits=consume)
    output.grad = None
    return lambda: loss_func(float16_to_fp32(output))[0].backward()


def test_inplace_training_loss_allocates_no_second_logits_sized_buffer():
    """bf16 output [4, 64, 4096]: the chain's own allocations are the upcast (1 fp32 logits unit)
    and the bf16 gradient (0.5 unit), so the in-place peak is 1.5 units, the copying one 2.0."""
    g = torch.Generator().manual_seed(3)
    batch_size, seq, vocab = 4, 64, 4096
    output = torch.randn(batch_size, seq, vocab, generator=g).to(torch.bfloat16).requires_grad_()
    batch = dict(targets=torch.randint(0, vocab, (batch_size, seq), generator=g), loss_mask=torch.ones(batch_size, seq),
                 rewards=torch.tensor([1.0, -0.5, 0.5, -1.0]), behavior_logprobs=-8.0 + torch.randn(batch_size, seq))
    unit = batch_size * seq * vocab * 4  # bytes of fp32 logits
    small = unit // 50  # [batch, seq]-sized temporaries are ~1/vocab of a unit
    copying = allocation_trace(_bf16_chain(False, output, batch, vocab))
    inplace = allocation_trace(_bf16_chain(True, output, batch, vocab))
    assert copying.at_least(unit) == 2 and copying.peak >= 2 * unit  # control: the copy is seen
    assert inplace.at_least(unit) == 1  # the upcast only
    assert 1.5 * unit <= inplace.peak <= 1.5 * unit + small
    assert inplace.at_least(unit // 2) == 2  # upcast and bf16 gradient, nothing else large
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_inplace_forward_only_logprobs_allocate_nothing_logits_sized():
    """The weight-sync check's path (training/forward.py): no_grad, a view without the last position."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 65, 4096, generator=g)
    targets = torch.randint(0, 4096, (4, 64), generator=g)
    unit = 4 * 64 * 4096 * 4
    results = {}
    for inplace in (False, True):
        work = logits.clone()

        def run(work=work, inplace=inplace):
            with torch.no_grad():
                results[inplace] = vocab_parallel_logprobs(work[:, :-1], targets, inplace=inplace)

        results[(inplace, "trace")] = allocation_trace(run)
    assert results[(False, "trace")].at_least(unit) == 1  # control
    assert results[(True, "trace")].at_least(unit // 50) == 0 and results[(True, "trace")].peak < unit // 50
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)


def test_inplace_refuses_parameters_and_views_of_them():
    targets = torch.zeros(2, 3, dtype=torch.long)
    param = torch.nn.Parameter(torch.randn(2, 3, 8))
    for logits in (param, param[:, :2]):
        with pytest.raises(ValueError, match=r"inplace=True would overwrite a leaf tensor that requires grad"):
            vocab_parallel_logprobs(logits, targets[:, : logits.shape[1]], inplace=True)
    before = param.detach().clone()
    vocab_parallel_logprobs(param, targets)  # the default never modifies its input
    assert torch.equal(param.detach(), before)


def test_bf16_train_step_consuming_logits_equals_copying_path(monkeypatch):
    """Three real bf16 `train_step`s (Float16Module, TP1, one gloo process) with the trainer's
    in-place loss and with the copying one forced: every metric identical, grad norm included."""
    import rift_megatron.training.step as step_module
    from rift_megatron.models import parse_hf_config
    from rift_megatron.models.presets import tiny_hf_config
    from rift_megatron.models.provider import PrecisionConfig
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.training.setup import OptimConfig, setup_training
    from tests.synthetic_batch import mixed_reward_batch

    inputs = []

    def run(consume: bool | None) -> list[dict[str, float]]:
        def loss_func_factory(*args, **kwargs):
            assert kwargs["consume_logits"] is True  # what train_step asks for
            if consume is not None:
                kwargs["consume_logits"] = consume
            loss_func = make_loss_func(*args, **kwargs)

            def recorded(output):
                inputs.append((output.dtype, output.grad_fn.name()))
                return loss_func(output)

            return recorded

        monkeypatch.setattr(step_module, "make_loss_func", loss_func_factory)
        init_distributed()
        init_model_parallel(ParallelLayout(), seed=0)
        try:
            arch = parse_hf_config(tiny_hf_config(), source="built-in tiny Llama config")
            state = setup_training(arch, ParallelLayout(), OptimConfig(lr=1e-3), PrecisionConfig("bf16"), total_steps=3)
            batch = mixed_reward_batch(seed=0, vocab_size=arch.vocab_size)
            return [step_module.train_step(state, batch, LossSettings(), micro_batch_size=2) for _ in range(3)]
        finally:
            destroy_model_parallel()

    copying, consuming = run(False), run(None)
    assert set(inputs) == {(torch.float32, "ToCopyBackward0")}  # Float16Module's upcast reached the loss
    assert consuming == copying
    assert consuming[0]["grad_norm"] > 0 and consuming[-1]["loss"] < consuming[0]["loss"]

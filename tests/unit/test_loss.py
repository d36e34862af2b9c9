"""Tests of rift_megatron.loss: values and gradients against an independent float64 reference,
the properties docs/objective.md requires (one test each), and the Megatron loss_func glue.

Tolerances: float64 inputs are compared to the reference with rtol=1e-10 / atol=1e-12; float32
inputs with rtol=1e-5 / atol=1e-6 (against the reference evaluated on the float32-rounded
inputs); gradients returned in bf16 / fp16 with rtol=2**-7 / 2**-10 (one rounding step of the
fp32 gradient); micro-batch invariance in float32 with rtol=1e-6 / atol=1e-7; where two code
paths must agree bit for bit (loss_func vs rift_token_loss, promoted bf16/fp16) rtol=atol=0.
"""

from __future__ import annotations

import math

import pytest
import torch

from rift_megatron.loss import (
    ALGORITHMS,
    GRANULARITIES,
    NORMALIZATIONS,
    LossSettings,
    count_sign_tokens,
    make_loss_func,
    reduce_loss_reports,
    rift_token_loss,
    vocab_parallel_logprobs,
)
from tests.unit.loss_reference import reference_logprobs, reference_loss_and_grad

F64_TOL = dict(rtol=1e-10, atol=1e-12)
F32_TOL = dict(rtol=1e-5, atol=1e-6)
SPLIT_TOL = dict(rtol=1e-6, atol=1e-7)
REWARDS = [1.0, -0.2, 0.0, -1.0, 0.5, -0.7, -0.5]  # mixed signs, a zero, and (last) an empty mask
RATIO_CAP = 1.1


def make_batch(seed: int = 0, n_steps: int = 7, vocab: int = 13) -> dict[str, torch.Tensor]:
    """A float64 batch with prompts/padding masked out, an empty-mask sample, and extreme tokens
    whose probability underflows (logit -1e4): a negative sample's (rho -> 0) and a positive's."""
    g = torch.Generator().manual_seed(seed)
    n = len(REWARDS)
    logits = 2.0 * torch.randn(n, n_steps, vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n, n_steps), generator=g)
    for i, t in ((1, 2), (1, 3), (0, 4)):
        logits[i, t, targets[i, t]] = -1e4
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    behavior = logprobs + 0.4 * torch.randn(n, n_steps, generator=g, dtype=torch.float64)
    behavior[1, 2] = behavior[1, 3] = behavior[0, 4] = -3.0  # the sampler found these tokens likely
    behavior[3] -= 0.6  # the current policy likes sample 3 more than the sampler did: rho_3 > cap
    mask = torch.zeros(n, n_steps, dtype=torch.int64)
    for i in range(n - 1):
        start, stop = i % 3, n_steps - (i % 2)
        mask[i, start:stop] = 1
    return dict(
        logits=logits,
        targets=targets,
        logprobs=logprobs,
        behavior=behavior,
        rewards=torch.tensor(REWARDS, dtype=torch.float64),
        mask=mask,
    )


def with_garbage(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Masked-out positions may hold anything; put poison there."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def run_reference(batch: dict, dtype: torch.dtype, **settings) -> tuple[float, torch.Tensor, int]:
    """The reference on the inputs as the package sees them (rounded to ``dtype``)."""
    lp = batch["logprobs"].to(dtype).double().tolist()
    bh = batch["behavior"].to(dtype).double().tolist()
    loss, grad, z = reference_loss_and_grad(
        lp, bh, batch["rewards"].to(dtype).double().tolist(), batch["mask"].tolist(), **settings
    )
    return loss, torch.tensor(grad, dtype=torch.float64), z


def normalized(loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    return loss_sum / num_tokens.clamp(min=1)


# --------------------------------------------------------------------------- reference agreement


@pytest.mark.parametrize("ratio_cap", [None, RATIO_CAP])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rift_token_loss_matches_float64_reference(dtype, algorithm, granularity, normalization, ratio_cap):
    batch = make_batch()
    settings = dict(algorithm=algorithm, ratio_cap=ratio_cap, granularity=granularity, normalization=normalization)
    ref_loss, ref_grad, ref_z = run_reference(batch, dtype, **settings)

    mask = batch["mask"]
    logprobs = with_garbage(batch["logprobs"].to(dtype), mask, float("nan")).requires_grad_()
    behavior = with_garbage(batch["behavior"].to(dtype), mask, float("-inf"))
    loss_sum, num_tokens = rift_token_loss(logprobs, behavior, batch["rewards"].to(dtype), mask, **settings)

    assert loss_sum.dtype == dtype and loss_sum.dim() == 0
    assert num_tokens.dtype == torch.int64 and num_tokens.dim() == 0
    assert int(num_tokens) == ref_z
    loss = normalized(loss_sum, num_tokens)
    loss.backward()
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=torch.float64), **tol)
    torch.testing.assert_close(logprobs.grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_reference_batch_exercises_the_ratio_cap_on_both_sides(granularity):
    """The cap case above only means something if the cap binds for some negatives and not others."""
    b = make_batch()
    capped = free = 0
    for i, r in enumerate(REWARDS):
        steps = [t for t in range(b["mask"].shape[1]) if b["mask"][i, t]]
        if r >= 0 or not steps:
            continue
        log_ratios = [float(b["logprobs"][i, t] - b["behavior"][i, t]) for t in steps]
        if granularity == "sequence":
            log_ratios = [sum(log_ratios) / len(log_ratios)]
        capped += sum(math.exp(x) > RATIO_CAP for x in log_ratios)
        free += sum(math.exp(x) <= RATIO_CAP for x in log_ratios)
    assert capped > 0 and free > 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_mask_gives_zero_loss_zero_tokens_and_zero_grads(algorithm):
    logprobs = torch.full((3, 4), float("nan"), requires_grad=True)  # garbage everywhere: all masked
    behavior = torch.full((3, 4), float("-inf"))
    loss_sum, num_tokens = rift_token_loss(
        logprobs, behavior, torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3, 4), algorithm=algorithm,
        normalization="per_sign",
    )
    assert float(loss_sum.detach()) == 0.0 and int(num_tokens) == 0
    normalized(loss_sum, num_tokens).backward()
    assert torch.equal(logprobs.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("algorithm", ["rift", "naive", "rft"])
def test_all_zero_rewards_give_zero_loss_and_zero_tokens(algorithm):
    logprobs = torch.randn(2, 5).requires_grad_()
    loss_sum, num_tokens = rift_token_loss(
        logprobs, logprobs.detach(), torch.zeros(2), torch.ones(2, 5), algorithm=algorithm
    )
    assert float(loss_sum.detach()) == 0.0 and int(num_tokens) == 0
    loss_sum.backward()
    assert torch.equal(logprobs.grad, torch.zeros(2, 5))


def test_sft_ignores_rewards_and_counts_every_masked_token():
    logprobs = -torch.rand(2, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    loss_sum, num_tokens = rift_token_loss(logprobs, logprobs, torch.tensor([0.0, -3.0]), mask, algorithm="sft")
    assert int(num_tokens) == 5
    torch.testing.assert_close(loss_sum, -(logprobs * mask).sum(), **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logprobs_are_promoted_to_float32(dtype):
    batch = make_batch()
    lp = batch["logprobs"].clamp(min=-60.0).to(dtype)  # fp16 cannot hold -1e4 * 1.0 products safely
    bh = batch["behavior"].to(dtype)
    low = lp.clone().requires_grad_()
    high = lp.float().requires_grad_()
    args = (batch["rewards"], batch["mask"])
    loss_low, n_low = rift_token_loss(low, bh, *args, ratio_cap=RATIO_CAP, normalization="per_sign")
    loss_high, n_high = rift_token_loss(high, bh.float(), *args, ratio_cap=RATIO_CAP, normalization="per_sign")
    assert loss_low.dtype == torch.float32 and int(n_low) == int(n_high)
    torch.testing.assert_close(loss_low, loss_high, rtol=0, atol=0)
    loss_low.backward()
    loss_high.backward()
    assert low.grad.dtype == dtype
    torch.testing.assert_close(low.grad.float(), high.grad.to(dtype).float(), rtol=0, atol=0)


# --------------------------------------------------------------------------- docs/objective.md properties


def _logprob_inputs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_logprobs(logits, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_property1_every_rift_term_is_nonnegative_for_random_logits(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (5.0 * torch.randn(6, 5, 32, generator=g)).to(dtype)
    targets = torch.randint(0, 32, (6, 5), generator=g)
    rewards = torch.tensor([1.0, -0.2, -1.0, 0.3, -5.0, -0.01])
    lp = vocab_parallel_logprobs(logits, targets)
    behavior = lp + 2.0 * torch.randn(6, 5, generator=g)  # ratios far from 1 both ways
    for ratio_cap in (None, 2.0):
        for i in range(6):
            for t in range(5):  # one token at a time: each single term must be >= 0
                one = torch.zeros(6, 5)
                one[i, t] = 1
                loss_sum, _ = rift_token_loss(lp, behavior, rewards, one, ratio_cap=ratio_cap)
                assert torch.isfinite(loss_sum) and float(loss_sum) >= 0.0, (i, t, float(loss_sum))
        for granularity in GRANULARITIES:
            for normalization in NORMALIZATIONS:
                loss_sum, n = rift_token_loss(lp, behavior, rewards, torch.ones(6, 5), ratio_cap=ratio_cap,
                                              granularity=granularity, normalization=normalization)
                assert torch.isfinite(loss_sum) and float(loss_sum) >= 0.0 and int(n) == 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_property1_rift_stays_bounded_when_negative_token_underflows_while_naive_runs_away(dtype):
    vocab, target = 16, 3
    rift_values, naive_values = [], []
    for suppressed in (-10.0, -1e2, -1e4, -1e30):
        logits = torch.linspace(-1.0, 1.0, vocab).repeat(2, 3, 1)
        logits[:, :, target] = suppressed
        logits = logits.to(dtype).requires_grad_()
        targets = torch.full((2, 3), target)
        behavior = torch.full((2, 3), -2.5)  # when sampled, the token was reasonably likely
        rewards = torch.tensor([-1.0, -0.2])
        for algorithm, values in (("rift", rift_values), ("naive", naive_values)):
            logits.grad = None
            lp = vocab_parallel_logprobs(logits, targets)
            loss_sum, n = rift_token_loss(lp, behavior, rewards, torch.ones(2, 3), algorithm=algorithm)
            loss = normalized(loss_sum, n)
            loss.backward()
            values.append(float(loss.detach()))
            if algorithm == "rift":
                assert torch.isfinite(loss) and float(loss.detach()) >= 0.0
                assert torch.isfinite(logits.grad.float()).all()
    assert rift_values[-1] == 0.0 and all(a >= b for a, b in zip(rift_values, rift_values[1:]))
    # naive: value = mean(|r| * l) -> -inf as l -> -inf (here below -1e3 and then ~ -6e29)
    assert all(a > b for a, b in zip(naive_values, naive_values[1:]))
    assert naive_values[2] < -1e3 and naive_values[3] < -1e29


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_property2_negative_gradient_is_closed_form_and_vanishes_as_token_is_suppressed(dtype, tol):
    vocab, target, reward, b = 10, 4, -0.5, -2.0
    rift_norms, naive_norms = [], []
    for suppressed in (0.0, -5.0, -10.0, -20.0, -60.0):
        base = torch.linspace(-1.0, 1.0, vocab, dtype=torch.float64)
        base[target] = suppressed
        logits = base.repeat(1, 3, 1).to(dtype).requires_grad_()
        targets = torch.full((1, 3), target)
        behavior = torch.full((1, 3), b, dtype=dtype)
        for algorithm, norms in (("rift", rift_norms), ("naive", naive_norms)):
            logits.grad = None
            lp = vocab_parallel_logprobs(logits, targets)
            loss_sum, n = rift_token_loss(lp, behavior, torch.tensor([reward], dtype=dtype), torch.ones(1, 3),
                                          algorithm=algorithm)
            normalized(loss_sum, n).backward()
            norms.append(float(logits.grad.double().norm()))
            # closed form, per token, divided by Z = 3
            z64 = logits.detach().double()
            softmax = torch.softmax(z64, -1)
            onehot = torch.nn.functional.one_hot(targets, vocab).double()
            logp = torch.log_softmax(z64, -1)[..., target]
            weight = abs(reward) * torch.exp(logp - b) if algorithm == "rift" else torch.full_like(logp, -reward)
            expected = weight[..., None] * (onehot - softmax) / 3
            torch.testing.assert_close(logits.grad.double(), expected, **tol)
    assert all(a > b for a, b in zip(rift_norms, rift_norms[1:]))
    assert rift_norms[-1] < 1e-20
    # naive: |r| * ||onehot - softmax|| / 3 * sqrt(3) -> |r|/sqrt(3) as p -> 0: does not vanish
    assert min(naive_norms) > 0.9 * abs(reward) / math.sqrt(3)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_ratio_cap_gives_zero_gradient_above_the_cap_even_when_rho_overflows(granularity):
    # token 0: rho = e^0.5 < C; token 1: rho = e^1 > C; token 2: rho = e^200 overflows float32
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    behavior = torch.tensor([[-1.5, -2.0, -201.0], [-1.5, -1.5, -1.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1]]) if granularity == "token" else torch.tensor([[1, 1, 1], [1, 1, 0]])
    cap = 2.0
    loss_sum, _ = rift_token_loss(logprobs, behavior, torch.tensor([-1.0, -0.5]), mask, ratio_cap=cap,
                                  granularity=granularity)
    loss_sum.backward()
    assert torch.isfinite(loss_sum) and torch.isfinite(logprobs.grad).all()
    if granularity == "token":
        assert float(loss_sum.detach()) == pytest.approx(math.exp(0.5) + cap + cap + 0.5 * 3 * math.exp(0.5))
        torch.testing.assert_close(logprobs.grad[0], torch.tensor([math.exp(0.5), 0.0, 0.0]))
    else:  # sample 0: mean log-ratio (0.5 + 1 + 200) / 3 -> capped: no gradient for any of its tokens
        assert float(loss_sum.detach()) == pytest.approx(3 * cap + 0.5 * 2 * math.exp(0.5))
        torch.testing.assert_close(logprobs.grad[0], torch.zeros(3))
        torch.testing.assert_close(logprobs.grad[1], torch.tensor([0.5 * math.exp(0.5)] * 2 + [0.0]))


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)])
def test_property3_at_rho_one_rift_gradient_equals_naive_for_both_signs(dtype, tol, granularity, normalization):
    g = torch.Generator().manual_seed(3)
    logits0 = torch.randn(4, 6, 20, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, 20, (4, 6), generator=g)
    rewards = torch.tensor([1.0, -0.2, 0.5, -1.0], dtype=dtype)
    mask = torch.ones(4, 6)
    mask[:, :2] = 0
    behavior = vocab_parallel_logprobs(logits0, targets).detach()  # theta = mu
    grads = {}
    for algorithm in ("rift", "naive"):
        logits = logits0.clone().requires_grad_()
        lp = vocab_parallel_logprobs(logits, targets)
        loss_sum, n = rift_token_loss(lp, behavior, rewards, mask, algorithm=algorithm,
                                      granularity=granularity, normalization=normalization)
        normalized(loss_sum, n).backward()
        grads[algorithm] = logits.grad
    assert grads["rift"].abs().sum() > 0
    torch.testing.assert_close(grads["rift"], grads["naive"], **tol)
    # and the negatives really contribute (rho=1 is not a degenerate zero-gradient point)
    assert grads["rift"][1].abs().sum() > 0 and grads["rift"][3].abs().sum() > 0


def _split_run(logits0, batch, settings, n_micro, sign_counts=None):
    """Run make_loss_func over ``n_micro`` micro-batches, sum, divide once (Megatron's
    calculate_per_token_loss path); return loss, grad of the full logits, and the metrics."""
    logits = logits0.clone().requires_grad_()
    total_loss = total_tokens = 0
    reports = []
    for rows in torch.arange(logits.shape[0]).chunk(n_micro):
        micro = {k: v[rows] for k, v in batch.items()}
        loss_func = make_loss_func(micro, settings, vocab_size=batch_vocab(logits0), sign_token_counts=sign_counts)
        loss_sum, num_tokens, report = loss_func(logits[rows])
        total_loss = total_loss + loss_sum
        total_tokens = total_tokens + num_tokens
        reports.append(report)
    loss = total_loss / total_tokens.clamp(min=1)
    loss.backward()
    return loss.detach(), logits.grad, reduce_loss_reports(reports)


def batch_vocab(logits: torch.Tensor) -> int:
    return logits.shape[-1] - 3  # the last 3 columns are TP padding in these tests


def make_loss_batch(seed: int = 4, n: int = 8, n_steps: int = 6, vocab: int = 29):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, n_steps, vocab + 3, generator=g)
    logits[..., vocab:] = 50.0  # padding columns with huge values: must be ignored
    targets = torch.randint(0, vocab, (n, n_steps), generator=g)
    with torch.no_grad():
        behavior = vocab_parallel_logprobs(logits, targets, vocab_size=vocab)
    behavior = behavior + 0.5 * torch.randn(n, n_steps, generator=g)
    # signs deliberately unbalanced across micro-batches (positives mostly first)
    rewards = torch.tensor([1.0, 1.0, 0.5, -0.2, 0.0, -1.0, -0.2, -0.7])[:n]
    mask = (torch.rand(n, n_steps, generator=g) < 0.8).long()
    batch = dict(targets=targets, loss_mask=mask, rewards=rewards, behavior_logprobs=behavior)
    return logits, batch


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("algorithm,granularity,ratio_cap",
                         [("rift", "token", None), ("rift", "sequence", 1.5), ("rift", "token", 1.2),
                          ("naive", "token", None), ("rft", "token", None), ("sft", "token", None)])
def test_property4_micro_batch_split_does_not_change_loss_or_grads(algorithm, granularity, ratio_cap, normalization):
    logits, batch = make_loss_batch()
    settings = LossSettings(algorithm=algorithm, ratio_cap=ratio_cap, granularity=granularity,
                            normalization=normalization)
    sign_counts = None
    if normalization == "per_sign":  # computed once per step over the whole global batch
        sign_counts = count_sign_tokens(batch["rewards"], batch["loss_mask"], algorithm=algorithm)
    loss1, grad1, metrics1 = _split_run(logits, batch, settings, 1, sign_counts)
    assert grad1.abs().sum() > 0
    for n_micro in (2, 4):
        loss_k, grad_k, metrics_k = _split_run(logits, batch, settings, n_micro, sign_counts)
        torch.testing.assert_close(loss_k, loss1, **SPLIT_TOL)
        torch.testing.assert_close(grad_k, grad1, **SPLIT_TOL)
        for key in metrics1:
            assert metrics_k[key] == pytest.approx(metrics1[key], rel=1e-6, abs=1e-7), key


def test_property4_per_sign_without_global_counts_would_depend_on_the_split():
    """Why sign_token_counts exists: per-call counts make per_sign split-dependent."""
    logits, batch = make_loss_batch()
    settings = LossSettings(normalization="per_sign")
    loss1, _, _ = _split_run(logits, batch, settings, 1)
    loss4, _, _ = _split_run(logits, batch, settings, 4)
    assert abs(float(loss4) - float(loss1)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_property5_saved_for_backward_is_at_most_one_fp32_logits_buffer(dtype):
    n, n_steps, vocab = 3, 4, 1024
    logits = torch.randn(n, n_steps, vocab).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (n, n_steps))
    saved_bytes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = vocab_parallel_logprobs(logits, targets, vocab_size=1000)
    assert saved_bytes, "the hook saw nothing: the measurement is broken"
    budget = n * n_steps * vocab * 4 + 32 * n * n_steps  # one fp32 logits buffer + O(batch*seq)
    assert sum(saved_bytes) <= budget, (saved_bytes, budget)
    lp.sum().backward()
    assert logits.grad.dtype == dtype


# --------------------------------------------------------------------------- vocab_parallel_logprobs


@pytest.mark.parametrize("padding_value", [1e4, float("nan"), float("-inf")])
@pytest.mark.parametrize(
    "dtype,value_tol,grad_tol",
    [
        (torch.float64, F64_TOL, F64_TOL),
        (torch.float32, F32_TOL, F32_TOL),
        (torch.bfloat16, F32_TOL, dict(rtol=2**-7, atol=1e-6)),  # fp32 math, grad rounded to bf16
        (torch.float16, F32_TOL, dict(rtol=2**-10, atol=1e-6)),
    ],
)
def test_vocab_parallel_logprobs_tp1_matches_reference_and_masks_padding(dtype, value_tol, grad_tol, padding_value):
    g = torch.Generator().manual_seed(5)
    vocab, padded = 13, 16
    logits = (4.0 * torch.randn(3, 5, padded, generator=g, dtype=torch.float64)).to(dtype)
    logits[..., vocab:] = padding_value
    targets = torch.randint(0, vocab, (3, 5), generator=g)
    targets[0, 0] = vocab - 1  # the last real token
    grad_out = torch.randn(3, 5, generator=g)
    original = logits.clone()

    leaf = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(leaf, targets, vocab_size=vocab)
    lp.backward(grad_out.to(lp.dtype))

    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rows = logits.double().reshape(-1, padded).tolist()
    ref, ref_dlogits = reference_logprobs(rows, targets.reshape(-1).tolist(), vocab)
    torch.testing.assert_close(lp.double(), torch.tensor(ref, dtype=torch.float64).reshape(3, 5), **value_tol)
    expected_grad = torch.tensor(ref_dlogits, dtype=torch.float64).reshape(3, 5, padded) * grad_out.double()[..., None]
    assert leaf.grad.dtype == dtype
    torch.testing.assert_close(leaf.grad.double(), expected_grad.to(dtype).double(), **grad_tol)
    assert torch.equal(leaf.grad[..., vocab:], torch.zeros_like(leaf.grad[..., vocab:]))
    torch.testing.assert_close(leaf.detach(), original, rtol=0, atol=0, equal_nan=True)  # input not modified


def test_vocab_parallel_logprobs_gradient_matches_autograd_of_log_softmax():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 4), generator=g)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    weights = torch.randn(2, 4, generator=g, dtype=torch.float64)
    (vocab_parallel_logprobs(a, targets) * weights).sum().backward()
    (torch.log_softmax(b, -1).gather(-1, targets[..., None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **F64_TOL)


def test_vocab_parallel_logprobs_rejects_target_outside_vocabulary():
    logits = torch.randn(2, 3, 16)
    targets = torch.zeros(2, 3, dtype=torch.long)
    targets[1, 2] = 14  # a padding column: not a real token
    with pytest.raises(ValueError, match=r"target token id 14 is outside the vocabulary of size 13"):
        vocab_parallel_logprobs(logits, targets, vocab_size=13)
    targets[1, 2] = -1
    with pytest.raises(ValueError, match=r"target token id -1 is outside the vocabulary of size 16"):
        vocab_parallel_logprobs(logits, targets)


def test_vocab_parallel_logprobs_rejects_bad_shapes_and_vocab_size():
    with pytest.raises(ValueError, match=r"targets must have shape logits.shape\[:-1\]=\[2, 3\], got \[2, 4\]"):
        vocab_parallel_logprobs(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 8\].*got 9"):
        vocab_parallel_logprobs(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), vocab_size=9)
    with pytest.raises(ValueError, match=r"targets must be an integer tensor"):
        vocab_parallel_logprobs(torch.randn(2, 3, 8), torch.zeros(2, 3))


def test_vocab_parallel_logprobs_refuses_second_backward_instead_of_wrong_grads():
    logits = torch.randn(1, 2, 5, requires_grad=True)
    lp = vocab_parallel_logprobs(logits, torch.zeros(1, 2, dtype=torch.long))
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        lp.sum().backward()


# --------------------------------------------------------------------------- bad inputs


def _args(n=4, s=3):
    return torch.randn(n, s), torch.randn(n, s), torch.tensor([1.0, -1.0, 0.5, 0.0])[:n], torch.ones(n, s)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: (a[0][0], *a[1:]), r"logprobs must have shape \[batch, seq\], got \[3\]"),
        (lambda a: (a[0], a[1][:, :2], *a[2:]),
         r"behavior_logprobs must have the same shape as logprobs \[4, 3\], got \[4, 2\]"),
        (lambda a: (*a[:3], a[3][:2]), r"loss_mask must have the same shape as logprobs \[4, 3\], got \[2, 3\]"),
        (lambda a: (a[0], a[1], a[2][:, None], a[3]), r"rewards must have shape \[batch\]=\[4\], got \[4, 1\]"),
        (lambda a: (a[0], a[1], torch.tensor([1.0, 0.0, float("nan"), 1.0]), a[3]),
         r"rewards contain NaN at sample index 2"),
        (lambda a: (a[0], a[1], torch.tensor([1.0, float("-inf"), 0.0, 1.0]), a[3]),
         r"rewards contain inf at sample index 1"),
        (lambda a: (*a[:3], torch.full((4, 3), 0.5)),
         r"loss_mask must contain only 0 and 1, got 0.5 at \[sample 0, token 0\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, message):
    with pytest.raises(ValueError, match=message):
        rift_token_loss(*mutate(_args()))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(algorithm="ppo"), r"algorithm must be one of \('rift', 'rft', 'sft', 'naive'\), got 'ppo'"),
        (dict(granularity="word"), r"granularity must be one of \('token', 'sequence'\), got 'word'"),
        (dict(normalization="mean"), r"normalization must be one of \('global', 'per_sign'\), got 'mean'"),
        (dict(ratio_cap=0.0), r"ratio_cap must be > 0 \(or None for no cap\), got 0.0"),
        (dict(ratio_cap=-2), r"ratio_cap must be > 0 \(or None for no cap\), got -2"),
        (dict(sign_token_counts=(3, 2)), r"sign_token_counts is only used with normalization='per_sign'"),
        (dict(normalization="per_sign", sign_token_counts=(1, 1)),
         r"must be the non-negative counts of the whole global batch"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rift_token_loss(*_args(), **kwargs)
    settings = {k: v for k, v in kwargs.items() if k != "sign_token_counts"}
    if "sign_token_counts" not in kwargs:  # LossSettings validates with the same messages
        with pytest.raises(ValueError, match=message):
            LossSettings(**settings)


def test_rift_rejects_nan_behavior_logprobs_at_masked_in_positions_only():
    lp, bh, r, m = _args()
    bh[1, 2] = float("nan")
    message = r"behavior_logprobs must be finite at masked-in positions.*nan at \[sample 1, token 2\]"
    with pytest.raises(ValueError, match=message):
        rift_token_loss(lp, bh, r, m)
    m[1, 2] = 0  # masked out: fine
    loss_sum, _ = rift_token_loss(lp, bh, r, m)
    assert torch.isfinite(loss_sum)


# --------------------------------------------------------------------------- Megatron glue


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_loss_func_matches_rift_token_loss_and_report_parts_add_up(normalization):
    logits, batch = make_loss_batch()
    vocab = batch_vocab(logits)
    settings = LossSettings(ratio_cap=1.3, normalization=normalization)
    a = logits.clone().requires_grad_()
    loss_sum, num_tokens, report = make_loss_func(batch, settings, vocab_size=vocab)(a)
    b = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(b, batch["targets"], vocab_size=vocab)
    exp_sum, exp_tokens = rift_token_loss(lp, batch["behavior_logprobs"], batch["rewards"], batch["loss_mask"],
                                          ratio_cap=1.3, normalization=normalization)
    torch.testing.assert_close(loss_sum, exp_sum, rtol=0, atol=0)
    assert int(num_tokens) == int(exp_tokens) > 0
    (loss_sum / num_tokens).backward()
    (exp_sum / exp_tokens).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)

    assert all(not v.requires_grad for v in report.values())
    torch.testing.assert_close(report["pos_loss_sum"] + report["neg_loss_sum"], report["loss_sum"], **F32_TOL)
    assert int(report["pos_tokens"] + report["neg_tokens"]) == int(report["tokens"]) == int(num_tokens)
    loss_sum.detach().mul_(0)  # Megatron divides the returned loss in place: the report must not change
    assert float(report["loss_sum"]) == pytest.approx(float(exp_sum.detach()))

    metrics = reduce_loss_reports([report])
    assert metrics["loss"] == pytest.approx(float(exp_sum.detach() / exp_tokens), rel=1e-6)
    assert metrics["loss_pos"] + metrics["loss_neg"] == pytest.approx(metrics["loss"], rel=1e-6)
    mask = batch["loss_mask"].bool()
    l = lp.detach()
    pos = mask & (batch["rewards"] > 0)[:, None]
    neg = mask & (batch["rewards"] < 0)[:, None]
    ratio = torch.exp(l - batch["behavior_logprobs"]).clamp(max=1.3)
    assert metrics["tokens"] == int(pos.sum() + neg.sum())
    assert metrics["frac_neg_tokens"] == pytest.approx(float(neg.sum()) / metrics["tokens"])
    assert metrics["logprob_mean_pos"] == pytest.approx(float(l[pos].mean()), rel=1e-6)
    assert metrics["logprob_mean_neg"] == pytest.approx(float(l[neg].mean()), rel=1e-6)
    assert metrics["ratio_mean_neg"] == pytest.approx(float(ratio[neg].mean()), rel=1e-6)
    assert metrics["ratio_max_neg"] == pytest.approx(float(ratio[neg].max()), rel=1e-6)


def test_reduce_loss_reports_handles_no_tokens_and_no_negatives():
    logits, batch = make_loss_batch()
    batch = dict(batch, rewards=torch.zeros_like(batch["rewards"]))
    _, num_tokens, report = make_loss_func(batch, LossSettings(), vocab_size=batch_vocab(logits))(logits)
    metrics = reduce_loss_reports([report, report])
    assert int(num_tokens) == 0
    diff_keys = {"logprob_diff_mean", "logprob_diff_max", "token_mult_prob_error", "response_tokens"}
    assert {k: v for k, v in metrics.items() if k not in diff_keys} == {k: 0.0 for k in metrics if k not in diff_keys}
    assert set(metrics) == {"loss", "loss_pos", "loss_neg", "frac_neg_tokens", "ratio_mean_neg", "ratio_max_neg",
                            "tokens", "logprob_mean_pos", "logprob_mean_neg"} | diff_keys
    assert metrics["response_tokens"] > 0  # the mismatch covers zero-reward samples too


def test_logprob_mismatch_metric_covers_every_response_token():
    """Trainer-vs-behaviour |l - b| over all masked tokens, zero-reward samples included."""
    logits, batch = make_loss_batch()
    batch = dict(batch, rewards=torch.zeros_like(batch["rewards"]))
    vocab = batch_vocab(logits)
    _, _, report = make_loss_func(batch, LossSettings(), vocab_size=vocab)(logits)
    metrics = reduce_loss_reports([report])
    logprobs = torch.log_softmax(logits.double()[..., :vocab], dim=-1).gather(-1, batch["targets"][..., None])[..., 0]
    mask = batch["loss_mask"] != 0
    diff = (logprobs - batch["behavior_logprobs"].double()).abs()[mask]
    assert mask.any()
    assert metrics["logprob_diff_mean"] == pytest.approx(float(diff.mean()), rel=1e-5)
    assert metrics["logprob_diff_max"] == pytest.approx(float(diff.max()), rel=1e-5)
    assert metrics["token_mult_prob_error"] == pytest.approx(float(diff.exp().mean()), rel=1e-5)
    assert metrics["response_tokens"] == int(mask.sum())


def test_rift_training_raises_positive_logprobs_and_lowers_negative_ones():
    """A few SGD steps on free logits: the report shows the intended direction of each sign."""
    logits, batch = make_loss_batch()
    vocab = batch_vocab(logits)
    param = logits.clone().requires_grad_()
    settings = LossSettings(normalization="per_sign")
    history = []
    for _ in range(15):
        param.grad = None
        loss_sum, num_tokens, report = make_loss_func(batch, settings, vocab_size=vocab)(param)
        (loss_sum / num_tokens).backward()
        with torch.no_grad():
            param -= 2.0 * param.grad
        history.append(reduce_loss_reports([report]))
    assert history[-1]["logprob_mean_pos"] > history[0]["logprob_mean_pos"] + 0.5
    assert history[-1]["logprob_mean_neg"] < history[0]["logprob_mean_neg"] - 0.5
    assert all(h["loss"] >= 0 and h["loss_neg"] >= 0 for h in history)


def test_make_loss_func_rejects_bad_batches():
    logits, batch = make_loss_batch()
    with pytest.raises(ValueError, match=r"batch is missing key\(s\) \['rewards'\]"):
        make_loss_func({k: v for k, v in batch.items() if k != "rewards"}, LossSettings(), vocab_size=29)
    loss_func = make_loss_func(batch, LossSettings(), vocab_size=29)
    with pytest.raises(ValueError, match=r"loss_func expects logits \[batch, seq, vocab_local\]"):
        loss_func(logits[:, :2])
    with pytest.raises(ValueError, match=r"sign_token_counts is only used with normalization='per_sign'"):
        make_loss_func(batch, LossSettings(), vocab_size=29, sign_token_counts=(1, 1))

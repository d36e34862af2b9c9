"""The RIFT family of objectives on plain per-token log-prob tensors (see docs/objective.md).

Nothing here knows about Megatron or parallelism: the functions take ``[batch, seq]`` log-probs
and return a SUM and a token COUNT, so any caller (one process, micro-batches, data-parallel
ranks) can add both up and divide once; the result is then independent of how the global batch
was split (docs/objective.md property 4).

Per-token terms ``c`` (``l``: current log-prob, ``b``: behaviour log-prob, ``rho = exp(l - b)``,
``C``: ``ratio_cap``), summed over masked-in tokens:

==========  ==========================  ===============================  ========================
algorithm   r > 0                       r < 0                            r = 0
==========  ==========================  ===============================  ========================
``rift``    ``-r * l``                  ``|r| * min(rho, C)``            no term, not in Z
``naive``   ``-r * l``                  ``-r * l`` (unbounded below)     no term, not in Z
``rft``     ``-l`` (weight 1)           dropped, not in Z                dropped, not in Z
``sft``     ``-l`` on every sample whatever its reward; every masked token counts in Z
==========  ==========================  ===============================  ========================

``rft`` ignores the reward's magnitude on purpose (it is rejection sampling: accepted samples are
plain demonstrations) and ``sft`` ignores rewards altogether (all samples are demonstrations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ALGORITHMS",
    "GRANULARITIES",
    "NORMALIZATIONS",
    "RiftLossTerms",
    "check_settings",
    "count_sign_tokens",
    "rift_loss_terms",
    "rift_token_loss",
]

ALGORITHMS = ("rift", "rft", "sft", "naive")
GRANULARITIES = ("token", "sequence")
NORMALIZATIONS = ("global", "per_sign")


def check_settings(algorithm: str, ratio_cap: float | None, granularity: str, normalization: str) -> None:
    """Validate the objective's knobs; shared by :func:`rift_token_loss` and ``LossSettings``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if ratio_cap is not None:
        if isinstance(ratio_cap, bool) or not isinstance(ratio_cap, (int, float)):
            raise ValueError(f"ratio_cap must be a number > 0 or None (no cap), got {ratio_cap!r}")
        if not ratio_cap > 0:  # also rejects NaN
            raise ValueError(f"ratio_cap must be > 0 (or None for no cap), got {ratio_cap!r}")


@dataclass(frozen=True)
class RiftLossTerms:
    """Everything one call computes. ``loss_sum``/``pos_loss_sum``/``neg_loss_sum`` are
    differentiable; the counts are int64; the diagnostics (``neg_ratio_*``, ``logprob_sum_*``)
    are detached. ``pos_loss_sum + neg_loss_sum == loss_sum`` for both normalisations."""

    loss_sum: Tensor
    num_tokens: Tensor
    pos_loss_sum: Tensor
    neg_loss_sum: Tensor
    pos_tokens: Tensor
    neg_tokens: Tensor
    neg_ratio_sum: Tensor
    neg_ratio_max: Tensor
    logprob_sum_pos: Tensor
    logprob_sum_neg: Tensor


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _first_index(mask: Tensor) -> list[int]:
    return [int(i) for i in mask.nonzero()[0]]


def _validate_tensors(
    logprobs: Tensor, behavior_logprobs: Tensor, rewards: Tensor, loss_mask: Tensor
) -> None:
    for name, t in (("logprobs", logprobs), ("behavior_logprobs", behavior_logprobs),
                    ("rewards", rewards), ("loss_mask", loss_mask)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [batch, seq], got {_shape(logprobs)}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got {logprobs.dtype}")
    if not behavior_logprobs.is_floating_point():
        raise ValueError(f"behavior_logprobs must be floating point, got {behavior_logprobs.dtype}")
    for name, t in (("behavior_logprobs", behavior_logprobs), ("loss_mask", loss_mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the same shape as logprobs {_shape(logprobs)}, got {_shape(t)}")
    if rewards.dim() != 1 or rewards.shape[0] != logprobs.shape[0]:
        raise ValueError(f"rewards must have shape [batch]=[{logprobs.shape[0]}], got {_shape(rewards)}")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise ValueError(f"rewards must be real numbers, got dtype {rewards.dtype}")
    if rewards.is_floating_point():
        bad = ~torch.isfinite(rewards)
        if bool(bad.any()):  # one host sync in the common (valid) case
            i = _first_index(bad)[0]
            kind = "NaN" if math.isnan(rewards[i].item()) else "inf"
            raise ValueError(f"rewards contain {kind} at sample index {i}")
    if loss_mask.dtype != torch.bool:
        bad = (loss_mask != 0) & (loss_mask != 1)
        if bool(bad.any()):
            i, t = _first_index(bad)
            raise ValueError(
                f"loss_mask must contain only 0 and 1, got {loss_mask[i, t].item()} at [sample {i}, token {t}]"
            )


def _sign_masks(rewards: Tensor, mask: Tensor, algorithm: str) -> tuple[Tensor, Tensor]:
    """Boolean [batch, seq] masks of the tokens that get a positive / negative term."""
    if algorithm == "sft":
        pos = torch.ones_like(rewards, dtype=torch.bool)
        neg = torch.zeros_like(pos)
    elif algorithm == "rft":
        pos, neg = rewards > 0, torch.zeros_like(rewards, dtype=torch.bool)
    else:
        pos, neg = rewards > 0, rewards < 0
    return mask & pos.unsqueeze(1), mask & neg.unsqueeze(1)


def count_sign_tokens(rewards: Tensor, loss_mask: Tensor, *, algorithm: str = "rift") -> tuple[Tensor, Tensor]:
    """``(Z_pos, Z_neg)`` int64 token counts of one micro-batch, as :func:`rift_token_loss` counts them.

    The trainer sums these over all micro-batches and data-parallel ranks once per step and passes
    the totals as ``sign_token_counts`` so that ``per_sign`` stays micro-batch invariant."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if loss_mask.dim() != 2 or rewards.shape != loss_mask.shape[:1]:
        raise ValueError(
            f"rewards must have shape [batch] and loss_mask [batch, seq], got {_shape(rewards)} and {_shape(loss_mask)}"
        )
    pos_tok, neg_tok = _sign_masks(rewards, loss_mask != 0, algorithm)
    return pos_tok.sum(), neg_tok.sum()


def _global_sign_counts(
    sign_token_counts: Sequence[int | Tensor] | None, local: tuple[Tensor, Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The (Z_pos, Z_neg) that ``per_sign`` divides by: the caller's global ones, or this call's."""
    if sign_token_counts is None:
        return local[0].to(dtype), local[1].to(dtype)
    if len(sign_token_counts) != 2:
        raise ValueError(f"sign_token_counts must be a pair (Z_pos, Z_neg), got {sign_token_counts!r}")
    device = local[0].device
    z_pos, z_neg = (torch.as_tensor(z, device=device).reshape(()) for z in sign_token_counts)
    if bool((z_pos < 0) | (z_neg < 0)) or bool((z_pos < local[0]) | (z_neg < local[1])):
        raise ValueError(
            f"sign_token_counts={tuple(int(z) for z in (z_pos, z_neg))} must be the non-negative counts of the "
            f"whole global batch, but this call alone has (Z_pos, Z_neg)={(int(local[0]), int(local[1]))}"
        )
    return z_pos.to(dtype), z_neg.to(dtype)


def rift_loss_terms(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    rewards: Tensor,
    loss_mask: Tensor,
    *,
    algorithm: str = "rift",
    ratio_cap: float | None = None,
    granularity: str = "token",
    normalization: str = "global",
    sign_token_counts: Sequence[int | Tensor] | None = None,
    sequence_sum: Callable[[Tensor], Tensor] | None = None,
) -> RiftLossTerms:
    """:func:`rift_token_loss` plus the per-sign parts and diagnostics the trainer reports.

    ``sequence_sum``: when the sequences are split over ranks (context parallelism) each call sees
    only part of every sequence; this function sums the per-sequence partial sums of
    ``granularity='sequence'`` (``[2, batch]``: log-ratio sum, negative-token count) over those
    ranks, differentiably. None: this call holds whole sequences.

    Ratio diagnostics: for ``rift`` the ratio that weights each negative token (capped; the
    sequence ratio for ``granularity='sequence'``); for ``naive`` the uncapped token ratio
    ``exp(l - b)`` (never used by its loss, only to watch the policy move; non-finite values
    from unvalidated behaviour log-probs are reported as 0); nothing for ``rft``/``sft``.
    """
    check_settings(algorithm, ratio_cap, granularity, normalization)
    if sign_token_counts is not None and normalization != "per_sign":
        raise ValueError(
            f"sign_token_counts is only used with normalization='per_sign', got normalization={normalization!r}"
        )
    _validate_tensors(logprobs, behavior_logprobs, rewards, loss_mask)

    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32  # promote bf16/fp16
    l = logprobs.to(dtype)
    # Behaviour log-probs and rewards are constants of the data: never differentiate through them.
    b = behavior_logprobs.detach().to(dtype)
    r = rewards.detach().to(dtype)
    mask = loss_mask != 0
    pos_tok, neg_tok = _sign_masks(r, mask, algorithm)
    used = pos_tok | neg_tok

    if algorithm == "rift":
        in_use = mask & (r != 0).unsqueeze(1)
        bad = in_use & ~torch.isfinite(b)
        if bool(bad.any()):
            i, t = _first_index(bad)
            raise ValueError(
                f"behavior_logprobs must be finite at masked-in positions for algorithm='rift', "
                f"got {b[i, t].item()} at [sample {i}, token {t}]"
            )

    zero = torch.zeros((), dtype=dtype, device=l.device)
    # Masked-out positions may hold garbage (-inf, NaN): replace them BEFORE any arithmetic so that
    # neither values nor gradients (0 * NaN = NaN) can be poisoned by them.
    l_used = torch.where(used, l, zero)
    pos_weight = torch.ones_like(r) if algorithm in ("sft", "rft") else r
    pos_terms = torch.where(pos_tok, -pos_weight.unsqueeze(1) * l_used, zero)

    ratio_diag = None
    if algorithm == "rift":
        # 0 off the negative tokens, so exp() cannot overflow there (0 * inf would be a NaN grad).
        log_ratio = torch.where(neg_tok, l_used - b, zero)
        if granularity == "sequence":
            partial = torch.stack([log_ratio.sum(dim=1), neg_tok.sum(dim=1).to(dtype)])
            whole = partial if sequence_sum is None else sequence_sum(partial)
            seq_log_ratio = whole[0] / whole[1].clamp(min=1)
            log_ratio = seq_log_ratio.unsqueeze(1).expand_as(l_used)
        if ratio_cap is not None:
            # Cap in log space: min(rho, C) = exp(min(log rho, log C)). Capping after exp() would
            # give NaN gradients (0 * inf) where rho overflows.
            log_ratio = log_ratio.clamp(max=math.log(ratio_cap))
        ratio = torch.exp(log_ratio)
        neg_terms = torch.where(neg_tok, r.abs().unsqueeze(1) * ratio, zero)
        ratio_diag = ratio.detach()
    elif algorithm == "naive":
        neg_terms = torch.where(neg_tok, -r.unsqueeze(1) * l_used, zero)
        ratio_diag = torch.exp(l_used.detach() - torch.where(neg_tok, b, zero))
        ratio_diag = torch.where(torch.isfinite(ratio_diag), ratio_diag, zero)
    else:
        neg_terms = torch.zeros_like(l_used)

    s_pos, s_neg = pos_terms.sum(), neg_terms.sum()
    z_pos, z_neg = pos_tok.sum(), neg_tok.sum()
    if normalization == "per_sign":
        # L = S_pos/Z_pos + S_neg/Z_neg, written as Z * L so that sum(loss_sum)/sum(num_tokens)
        # over micro-batches/ranks is exact when the global (Z_pos, Z_neg) are passed in.
        zg_pos, zg_neg = _global_sign_counts(sign_token_counts, (z_pos, z_neg), dtype)
        zg = zg_pos + zg_neg
        s_pos = s_pos * (zg / zg_pos.clamp(min=1))  # a missing sign has S = 0: contributes 0
        s_neg = s_neg * (zg / zg_neg.clamp(min=1))

    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=l.device)
    if ratio_diag is not None and ratio_diag.numel() > 0:  # no host sync: -inf/0 when no negatives
        neg_ratio_sum = torch.where(neg_tok, ratio_diag, zero).sum()
        neg_ratio_max = torch.where(neg_tok, ratio_diag, minus_inf).amax()
    else:
        neg_ratio_sum, neg_ratio_max = zero.clone(), minus_inf

    l_detached = l.detach()
    return RiftLossTerms(
        loss_sum=s_pos + s_neg,
        num_tokens=z_pos + z_neg,
        pos_loss_sum=s_pos,
        neg_loss_sum=s_neg,
        pos_tokens=z_pos,
        neg_tokens=z_neg,
        neg_ratio_sum=neg_ratio_sum,
        neg_ratio_max=neg_ratio_max,
        logprob_sum_pos=torch.where(pos_tok, l_detached, zero).sum(),
        logprob_sum_neg=torch.where(neg_tok, l_detached, zero).sum(),
    )


def rift_token_loss(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    rewards: Tensor,
    loss_mask: Tensor,
    *,
    algorithm: str = "rift",
    ratio_cap: float | None = None,
    granularity: str = "token",
    normalization: str = "global",
    sign_token_counts: Sequence[int | Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The RIFT-family loss of one (micro-)batch as ``(loss_sum, num_tokens)``.

    The loss is ``loss_sum / num_tokens``. Both are sums, so callers add them over micro-batches
    and data-parallel ranks and divide ONCE: the result is the loss of the whole global batch,
    whatever the split (this is what Megatron's ``calculate_per_token_loss=True`` does).

    Args:
        logprobs: ``[batch, seq]`` current log-probs ``l`` (differentiable).
        behavior_logprobs: ``[batch, seq]`` log-probs ``b`` of the policy that sampled the tokens.
            Treated as constants. Must be finite at masked-in tokens of non-zero-reward samples
            for ``rift`` (only its negatives use them; NaN there is a data bug worth an error).
        rewards: ``[batch]`` finite scalar rewards.
        loss_mask: ``[batch, seq]`` of 0/1 (bool, int or float): 1 on response tokens.
            Masked-out positions of ``logprobs``/``behavior_logprobs`` may hold anything (-inf,
            NaN): they never reach values or gradients.
        algorithm: one of :data:`ALGORITHMS` (table in the module docstring). ``rft`` gives
            samples with ``r > 0`` weight 1 and drops ``r <= 0``; ``sft`` treats every sample as
            a demonstration (rewards ignored, every masked token counts in Z).
        ratio_cap: ``C`` in ``min(rho, C)`` for ``rift`` negatives; ``None`` means no cap. Where
            ``rho > C`` the term is constant, so its gradient is zero.
        granularity: ``token`` (``rho`` per token) or ``sequence`` (``rho_i = exp(mean_t(l - b))``
            over the masked tokens of sample i, applied to each of them). Only ``rift`` negatives
            use a ratio, so it has no effect for the other algorithms.
        normalization: ``global`` (``Z`` = all counted tokens) or ``per_sign``
            (``S_pos/Z_pos + S_neg/Z_neg``; a sign without tokens contributes 0; for ``sft`` and
            ``rft`` all tokens are positive, so it equals ``global``).
        sign_token_counts: ``per_sign`` only: ``(Z_pos, Z_neg)`` of the WHOLE global batch (see
            :func:`count_sign_tokens`). Then ``loss_sum = Z_g * (S_pos/Z_pos_g + S_neg/Z_neg_g)``
            with ``Z_g = Z_pos_g + Z_neg_g`` and ``num_tokens`` is this call's count, so summing
            over all micro-batches and dividing gives the global ``per_sign`` loss exactly.
            Without it, this call's own counts are used (exact when one call holds the batch).

    Returns:
        ``loss_sum``: 0-dim float32 (float64 for float64 ``logprobs``), differentiable w.r.t.
        ``logprobs``, and ``num_tokens``: 0-dim int64 (``Z``). With no counted token both are 0
        and ``loss_sum`` is still attached to the graph (backward gives zero gradients).

    Numerics (docs/objective.md properties 1-3): computed in at least float32. Every ``rift`` term is >= 0
    and finite when a negative token's probability underflows (``rho -> 0``); the negative
    term's gradient w.r.t. ``l`` is ``|r| * rho`` (so w.r.t. the logits ``|r| * rho *
    (onehot - softmax)``), which vanishes as the token is suppressed, and at ``rho = 1`` equals
    the naive ``-r``. Without a cap ``rho`` can overflow to inf when ``l - b > ~88`` in float32
    (the current policy is ~1e38 times likelier than the sampler): set ``ratio_cap`` to bound it.

    Raises:
        ValueError: bad shapes or settings, non-finite rewards, non-finite behaviour log-probs
            (``rift``), a non 0/1 mask, or inconsistent ``sign_token_counts``; the message names
            the argument and the offending value.
    """
    terms = rift_loss_terms(
        logprobs,
        behavior_logprobs,
        rewards,
        loss_mask,
        algorithm=algorithm,
        ratio_cap=ratio_cap,
        granularity=granularity,
        normalization=normalization,
        sign_token_counts=sign_token_counts,
    )
    return terms.loss_sum, terms.num_tokens

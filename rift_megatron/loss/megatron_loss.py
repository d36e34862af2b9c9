"""The RIFT loss in the shape Megatron-Core's pipeline schedules expect.

A schedule calls ``loss_func(output_tensor)`` on the last pipeline stage and accepts
``(loss, num_tokens, report)``. With ``TransformerConfig.calculate_per_token_loss=True`` (which
RIFT requires: Z is the token count of the whole global batch) it sums ``num_tokens`` over
micro-batches without dividing the loss, and ``finalize_model_grads`` all-reduces ``num_tokens``
over data-parallel ranks and scales the gradients by ``1 / num_tokens`` (skipping a zero count).
That is exactly the "sum, then divide once" contract of :func:`rift_token_loss`, so this module
only glues the pieces together and keeps the loss ignorant of the schedule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from rift_megatron.parallel import all_reduce_sum_differentiable

from .logprobs import vocab_parallel_logprobs
from .objective import RiftLossTerms, check_settings, rift_loss_terms

__all__ = ["BATCH_KEYS", "LossSettings", "make_loss_func", "reduce_loss_reports"]

BATCH_KEYS = ("targets", "loss_mask", "rewards", "behavior_logprobs")

# Per-micro-batch sums in a report; keys ending in "_max" are maxima instead.
_SUM_KEYS = (
    "loss_sum",
    "tokens",
    "pos_loss_sum",
    "neg_loss_sum",
    "pos_tokens",
    "neg_tokens",
    "neg_ratio_sum",
    "logprob_sum_pos",
    "logprob_sum_neg",
    "logprob_diff_sum",
    "logprob_mult_error_sum",
    "response_tokens",
)
_MAX_KEYS = ("neg_ratio_max", "logprob_diff_max")

LossFunc = Callable[[Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class LossSettings:
    """The objective's knobs (meaning: :func:`rift_token_loss`), validated when built so a bad
    config fails at start-up rather than at the first micro-batch."""

    algorithm: str = "rift"
    ratio_cap: float | None = None
    granularity: str = "token"
    normalization: str = "global"

    def __post_init__(self) -> None:
        check_settings(self.algorithm, self.ratio_cap, self.granularity, self.normalization)


def _mismatch(logprobs: Tensor, behavior: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """|trainer - behaviour| log-prob over all response tokens. At the first update after a
    weight sync this is the trainer-vs-engine mismatch (kernels, dtypes, a failed sync)."""
    used = mask != 0
    diff = torch.where(used, (logprobs.detach().double() - behavior.detach().double()).abs(), 0.0)
    return {
        "logprob_diff_sum": diff.sum(),
        "logprob_mult_error_sum": torch.where(used, diff.exp(), 0.0).sum(),
        "logprob_diff_max": diff.max() if diff.numel() else diff.new_zeros(()),
        "response_tokens": used.sum(),
    }


def _report(terms: RiftLossTerms, extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached clones: Megatron may modify returned tensors in place (e.g. ``loss /= n``)."""
    values = {
        **extra,
        "loss_sum": terms.loss_sum,
        "tokens": terms.num_tokens,
        "pos_loss_sum": terms.pos_loss_sum,
        "neg_loss_sum": terms.neg_loss_sum,
        "pos_tokens": terms.pos_tokens,
        "neg_tokens": terms.neg_tokens,
        "neg_ratio_sum": terms.neg_ratio_sum,
        "neg_ratio_max": terms.neg_ratio_max,
        "logprob_sum_pos": terms.logprob_sum_pos,
        "logprob_sum_neg": terms.logprob_sum_neg,
    }
    return {k: v.detach().clone() for k, v in values.items()}


def make_loss_func(
    batch: Mapping[str, Tensor],
    settings: LossSettings,
    *,
    vocab_size: int,
    tp_group: Any = None,
    sign_token_counts: Sequence[int | Tensor] | None = None,
    cp_group: Any = None,
    consume_logits: bool = False,
) -> LossFunc:
    """Bind one micro-batch to a Megatron ``loss_func(logits) -> (loss_sum, num_tokens, report)``.

    Args:
        batch: ``targets`` [b, s] int64 token ids (the tokens whose log-prob is taken: the inputs
            shifted by one), ``loss_mask`` [b, s], ``rewards`` [b], ``behavior_logprobs`` [b, s].
        settings: the objective.
        vocab_size: the true vocabulary size; logits columns beyond it are TP padding.
        tp_group: tensor-parallel group the logits' vocabulary is split over (None: no TP).
        sign_token_counts: global ``(Z_pos, Z_neg)`` for ``per_sign`` (see ``count_sign_tokens``).
        cp_group: context-parallel group the sequence is split over (None: no CP). ``batch`` and
            the logits are then this rank's share of the positions; the per-sequence sums of
            ``granularity='sequence'`` are all-reduced over the group. The returned sums stay
            this rank's: the schedule sums them over the data-parallel-with-CP group.
        consume_logits: ``loss_func`` may overwrite the logits it is given (``vocab_parallel_logprobs``
            with ``inplace=True``). Right when the caller drops them afterwards, as Megatron's
            schedule does with the model output (its own ``vocab_parallel_cross_entropy`` works in
            place on it too): fp32 logits, e.g. ``Float16Module``'s upcast, then need no second
            logits-sized fp32 buffer.

    The returned ``loss_sum`` is NOT divided by anything: run the schedule with
    ``calculate_per_token_loss=True``. ``report`` holds per-micro-batch sums for
    :func:`reduce_loss_reports`.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing key(s) {missing}; expected {list(BATCH_KEYS)}")
    if sign_token_counts is not None and settings.normalization != "per_sign":
        raise ValueError(
            "sign_token_counts is only used with normalization='per_sign', "
            f"got normalization={settings.normalization!r}"
        )
    targets = batch["targets"]
    sequence_sum = None if cp_group is None else functools.partial(all_reduce_sum_differentiable, group=cp_group)

    def loss_func(output_tensor: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if output_tensor.dim() != 3 or tuple(output_tensor.shape[:2]) != tuple(targets.shape):
            raise ValueError(
                f"loss_func expects logits [batch, seq, vocab_local] with [batch, seq]={list(targets.shape)}, "
                f"got {list(output_tensor.shape)} (was the model called with labels?)"
            )
        logprobs = vocab_parallel_logprobs(
            output_tensor, targets, vocab_size=vocab_size, tp_group=tp_group, inplace=consume_logits
        )
        terms = rift_loss_terms(
            logprobs,
            batch["behavior_logprobs"],
            batch["rewards"],
            batch["loss_mask"],
            algorithm=settings.algorithm,
            ratio_cap=settings.ratio_cap,
            granularity=settings.granularity,
            normalization=settings.normalization,
            sign_token_counts=sign_token_counts,
            sequence_sum=sequence_sum,
        )
        mismatch = _mismatch(logprobs, batch["behavior_logprobs"], batch["loss_mask"])
        return terms.loss_sum, terms.num_tokens, _report(terms, mismatch)

    return loss_func


def _stack(report: Mapping[str, Tensor], keys: Sequence[str], device: torch.device) -> Tensor:
    missing = [k for k in keys if k not in report]
    if missing:
        raise ValueError(f"loss report is missing key(s) {missing}; was it made by make_loss_func?")
    return torch.stack([report[k].detach().to(device, torch.float64).reshape(()) for k in keys])


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def reduce_loss_reports(reports: Sequence[Mapping[str, Tensor]], group: Any = None) -> dict[str, float]:
    """Per-step metrics from the reports of all micro-batches (and all data-parallel ranks).

    Sums each key over micro-batches (max for ``*_max`` keys), then all-reduces over ``group``
    (the data-parallel group; ``None``, size 1 or no initialised ``torch.distributed``: this
    process only). Every rank of ``group`` must call it. Ratios are taken only after summing, so
    the metrics are those of the global batch, not means of per-micro-batch means.

    Returns ``loss`` (= loss_sum / tokens; 0 without tokens), ``loss_pos`` and ``loss_neg`` (each
    part / tokens, adding up to ``loss``), ``frac_neg_tokens``, ``ratio_mean_neg``,
    ``ratio_max_neg`` (0 without negatives), ``tokens``, ``logprob_mean_pos``, ``logprob_mean_neg``,
    ``logprob_diff_mean`` / ``logprob_diff_max``: |trainer - behaviour| log-prob over all
    ``response_tokens`` (the trainer-vs-engine mismatch at the first update after a weight sync),
    and ``token_mult_prob_error``: NeMo-RL's mean(exp|trainer - behaviour|) over them (1 = equal).
    """
    device = reports[0]["loss_sum"].device if reports else torch.device("cpu")
    sums = torch.zeros(len(_SUM_KEYS), dtype=torch.float64, device=device)
    maxs = torch.full((len(_MAX_KEYS),), float("-inf"), dtype=torch.float64, device=device)
    for rep in reports:
        sums += _stack(rep, _SUM_KEYS, device)
        maxs = torch.maximum(maxs, _stack(rep, _MAX_KEYS, device))
    if group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)
    total = dict(zip(_SUM_KEYS, sums.tolist()))
    ratio_max = maxs.tolist()[0]
    tokens = total["tokens"]
    return {
        "loss": _div(total["loss_sum"], tokens),
        "loss_pos": _div(total["pos_loss_sum"], tokens),
        "loss_neg": _div(total["neg_loss_sum"], tokens),
        "frac_neg_tokens": _div(total["neg_tokens"], tokens),
        "ratio_mean_neg": _div(total["neg_ratio_sum"], total["neg_tokens"]),
        "ratio_max_neg": ratio_max if ratio_max > float("-inf") else 0.0,
        "tokens": tokens,
        "logprob_mean_pos": _div(total["logprob_sum_pos"], total["pos_tokens"]),
        "logprob_mean_neg": _div(total["logprob_sum_neg"], total["neg_tokens"]),
        "logprob_diff_mean": _div(total["logprob_diff_sum"], total["response_tokens"]),
        "logprob_diff_max": max(maxs.tolist()[1], 0.0),
        "token_mult_prob_error": _div(total["logprob_mult_error_sum"], total["response_tokens"]) or 1.0,
        "response_tokens": total["response_tokens"],
    }

"""Per-token log-probabilities from vocab-parallel logits.

Under tensor parallelism Megatron's output layer leaves every rank with a contiguous slice of the
(padded) vocabulary: rank ``r`` holds columns ``[r * V_local, (r + 1) * V_local)``. RIFT needs
``log pi(y_t)`` for the sampled token only, so gathering the full ``[batch, seq, vocab]`` logits
(tens of GB for a 150k vocabulary at long sequence lengths) would be pure waste. Instead, like
Megatron's ``vocab_parallel_cross_entropy``, the log-softmax is assembled from two all-reduces
over the tensor-parallel group of ``O(batch * seq)`` numbers each (docs/objective.md property 5):

1. the per-token maximum (``MAX``), for numerical stability;
2. the per-token sum of ``exp(logit - max)`` together with the target logit, which lives on
   exactly one rank (one ``SUM`` over a stacked ``[2, batch, seq]`` tensor).

It returns log-probs instead of a loss and masks the vocabulary padding, so padded columns never
receive probability mass whatever their value.

Memory: the softmax saved for backward lives in one logits-sized float32 buffer, and the backward
pass turns that same buffer into the gradient in place. By default the buffer is a copy and the
caller's logits are left alone (they may be reused). With ``inplace=True`` the buffer IS the
caller's logits when they are already float32/float64, as in Megatron's cross entropy: that is
the training loss's case, where the model output is a fresh fp32 tensor (``Float16Module``'s
upcast of the bf16 logits, or the fp32 output layer's result) that nothing else reads, and a copy
would be a second logits-sized fp32 buffer (4.2 GB at vocabulary 128256 x 8192 tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["vocab_parallel_logprobs"]


def _tp_rank_and_size(tp_group: Any) -> tuple[int, int]:
    """(rank, size) of ``tp_group``; ``None`` or no initialised process group means no TP."""
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _check_inputs(logits: Tensor, targets: Tensor, vocab_size: int | None, tp_size: int) -> int:
    """Validate shapes and token ids; return the true vocabulary size."""
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        got = logits.dtype if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor [batch, seq, vocab_local], got {got}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {list(logits.shape)}")
    if not torch.is_tensor(targets) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        got = targets.dtype if torch.is_tensor(targets) else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of token ids, got {got}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets must have shape logits.shape[:-1]={list(logits.shape[:-1])}, got {list(targets.shape)}"
        )
    padded = logits.shape[-1] * tp_size
    if vocab_size is None:
        vocab_size = padded
    elif not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size must be in [1, {padded}] (vocab_local={logits.shape[-1]} x tensor-parallel size "
            f"{tp_size}), got {vocab_size}"
        )
    if targets.numel() > 0:
        bad = (targets < 0) | (targets >= vocab_size)
        if bool(bad.any()):
            first = int(targets[bad].reshape(-1)[0])
            raise ValueError(f"target token id {first} is outside the vocabulary of size {vocab_size}")
    return vocab_size


def _check_overwritable(logits: Tensor) -> None:
    """Refuse ``inplace`` on a leaf that requires grad (or a view of one): the forward runs with
    autograd off, so nothing else would stop it from overwriting a parameter or the caller's input."""
    root = logits if logits._base is None else logits._base
    if root.is_leaf and root.requires_grad:
        raise ValueError(
            "inplace=True would overwrite a leaf tensor that requires grad (a parameter or the caller's "
            "input); pass logits computed by the model, or inplace=False"
        )


class _VocabParallelLogProbs(torch.autograd.Function):
    """log softmax(logits)[target] over a vocabulary split across the tensor-parallel group."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        vocab_size: int,
        tp_rank: int,
        tp_size: int,
        tp_group: Any,
        inplace: bool,
    ) -> Tensor:
        vocab_local = logits.shape[-1]
        start = tp_rank * vocab_local
        n_valid = max(0, min(vocab_local, vocab_size - start))  # columns of this rank that are real tokens
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        communicate = tp_size > 1

        # Target logit: present on exactly one rank, 0 elsewhere, so a SUM picks it. Read before
        # the logits may be overwritten in place below.
        local_targets = targets - start
        in_range = (local_targets >= 0) & (local_targets < n_valid)
        local_idx = torch.where(in_range, local_targets, torch.zeros_like(local_targets))
        target_logit = logits.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
        target_logit = torch.where(in_range, target_logit, torch.zeros_like(target_logit))

        # 1. Global max over real tokens only: a padded column (arbitrary value) must not set the scale.
        if n_valid > 0:
            logits_max = logits[..., :n_valid].amax(dim=-1).to(compute_dtype)
        else:
            logits_max = torch.full(logits.shape[:-1], float("-inf"), dtype=compute_dtype, device=logits.device)
        if communicate:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)

        # 2. exp(logits - max) in the single logits-sized buffer (the logits themselves when the
        # caller gave them up and they already have the compute dtype); padding contributes 0.
        buf = logits if inplace and logits.dtype == compute_dtype else logits.to(compute_dtype, copy=True)
        buf.sub_(logits_max.unsqueeze(-1)).exp_()
        if n_valid < vocab_local:
            buf[..., n_valid:] = 0.0

        sums = torch.stack([buf.sum(dim=-1), target_logit])  # one all-reduce for both
        if communicate:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logit = sums[0], sums[1]

        logprobs = target_logit - logits_max - torch.log(sum_exp)

        buf.div_(sum_exp.unsqueeze(-1))  # now the (local slice of the) softmax
        ctx.save_for_backward(buf, local_idx, in_range)
        ctx.logits_dtype = logits.dtype
        ctx.consumed = False
        out = logprobs if compute_dtype == torch.float64 else logprobs.to(torch.float32)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.consumed:
            # The saved softmax was overwritten in place by the first backward (to avoid a second
            # logits-sized buffer), so a second pass would silently produce wrong gradients.
            raise RuntimeError(
                "vocab_parallel_logprobs does not support a second backward through the same graph "
                "(retain_graph=True): its saved softmax is reused in place for the gradient"
            )
        softmax, local_idx, in_range = ctx.saved_tensors
        ctx.consumed = True
        # d log p_y / d z_j = onehot_y(j) - softmax_j: purely local, no communication needed.
        grad = softmax.neg_()
        grad.scatter_add_(-1, local_idx.unsqueeze(-1), in_range.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_out.to(grad.dtype).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    vocab_size: int | None = None,
    tp_group: Any = None,
    inplace: bool = False,
) -> Tensor:
    """Log-probability of each target token, computed from vocab-parallel logits.

    Args:
        logits: ``[batch, seq, vocab_local]`` (fp32/bf16/fp16), this rank's contiguous slice of
            the padded vocabulary (Megatron's VocabParallel layout). Not modified unless ``inplace``.
        targets: ``[batch, seq]`` int64 global token ids. Positions that the loss masks out must
            still hold a valid id (e.g. the pad token), since every id is range-checked.
        vocab_size: the true vocabulary size. Columns with a global index ``>= vocab_size`` are the
            padding Megatron adds to make the vocabulary divisible by TP; they are excluded from the
            softmax so they can never leak probability. ``None``: no padding.
        tp_group: tensor-parallel process group. ``None``, a group of size 1, or an uninitialised
            ``torch.distributed`` means the logits hold the whole vocabulary (no communication).
        inplace: the caller gives the logits up: float32/float64 logits become the softmax kept
            for backward and then the gradient, so their values are garbage after the call and no
            second logits-sized buffer is allocated. Half-precision logits are converted to a
            float32 buffer as without ``inplace`` (and left unchanged). Refused for a leaf tensor
            that requires grad (a parameter) or a view of one: that would overwrite weights.

    Returns:
        float32 ``[batch, seq]`` log pi(target) (float64 if the logits are float64), identical on
        every rank of the group. Differentiable w.r.t. ``logits``; the gradient has the logits' dtype.

    Why not gather the vocabulary: the full logits are ``batch * seq * vocab`` numbers; the
    all-reduces here move ``3 * batch * seq`` numbers and the extra memory is at most one float32
    logits-sized buffer (the softmax kept for backward, reused in place for the gradient; none
    with ``inplace`` and fp32 logits), which is what docs/objective.md property 5 requires.

    Raises:
        ValueError: on bad shapes, a ``vocab_size`` larger than the padded vocabulary, a target id
            outside ``[0, vocab_size)``, or ``inplace`` on a parameter-like tensor.
    """
    tp_rank, tp_size = _tp_rank_and_size(tp_group)
    vocab_size = _check_inputs(logits, targets, vocab_size, tp_size)
    if inplace:
        _check_overwritable(logits)
    return _VocabParallelLogProbs.apply(logits, targets.long(), vocab_size, tp_rank, tp_size, tp_group, inplace)

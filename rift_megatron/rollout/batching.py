"""Generations + rewards -> the training batch the Megatron step consumes.

One :class:`Sample` is a prompt, the response the behaviour policy ``mu`` sampled for it, ``mu``'s
log-prob of every response token, and the reward. :func:`build_train_batch` lays samples out as
the :mod:`rift_megatron.training.batch` format (right-padded rows):

    tokens             prompt + response + pad ...
    targets[t]         tokens[t + 1]          (the last position's target is ``pad_id``)
    loss_mask[t]       1 exactly where targets[t] is a response token:
                       t = len(prompt) - 1 ... len(prompt) + len(response) - 2
    behavior_logprobs  at those t: log mu(targets[t] | tokens[:t + 1]) = the sample's
                       behavior_logprobs[t - len(prompt) + 1]; 0 elsewhere

so position ``t`` of the model's output (which predicts token ``t + 1``) carries the log-prob of
the same token under the behaviour policy: the ratio ``exp(l - b)`` compares like with like.
Prompt tokens and padding are out of the loss. Nothing is ever truncated: a sample longer than
``seq_len`` is an error.

Sequence packing (several samples per row) is not implemented: Megatron's packed-sequence
attention needs ``PackedSeqParams`` with Transformer Engine's fused attention (GPU), and without
it samples in one row would attend to each other. Padding is exact everywhere; its cost is cut
by the trainer, which can group samples of similar length into micro-batches padded only to their
own longest sample (``training.max_tokens_per_micro_batch``, rift_megatron/training/packing.py).

The token count ``Z`` the loss divides by is NOT a property of one batch: it is the count over the
whole global batch (all micro-batches, all data-parallel ranks; for RIFT only samples with a
non-zero reward count). The trainer computes it once per step (see
:func:`rift_megatron.loss.count_sign_tokens` and the loss's ``num_tokens``);
:func:`count_loss_tokens` is only the number of masked-in tokens of one batch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from rift_megatron.training.batch import TrainBatch, validate_batch

__all__ = ["Sample", "build_train_batch", "count_loss_tokens"]


@dataclass(frozen=True)
class Sample:
    """One generation.

    ``behavior_logprobs[t] = log mu(response_ids[t] | prompt, response_ids[:t])``: one per response
    token, as the rollout engine recorded them (or as recomputed by the trainer).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    behavior_logprobs: list[float]
    reward: float


def _token_ids(ids: Sequence[int], what: str, index: int) -> list[int]:
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        bad = next(i for i in ids if not _is_int(i))
        raise ValueError(f"sample {index}: {what} must be integer token ids, got {bad!r}") from None
    if any(i < 0 for i in out):
        raise ValueError(f"sample {index}: {what} contains a negative token id {min(out)}")
    return out


def _is_int(value: object) -> bool:
    try:
        operator.index(value)
        return True
    except TypeError:
        return False


def build_train_batch(
    samples: Sequence[Sample],
    *,
    pad_id: int,
    seq_len: int | None = None,
    pad_to_multiple_of: int = 1,
) -> TrainBatch:
    """The training batch (``tokens``, ``position_ids``, ``targets``, ``loss_mask``, ``rewards``,
    ``behavior_logprobs``) of ``samples``, in order.

    Args:
        samples: at least one; every prompt needs at least one token (the first response token is
            predicted from the last prompt token). An empty response is allowed (no loss tokens).
        pad_id: the id that fills the rows after each sample (never in the loss).
        seq_len: the row length; ``None`` means the longest sample. A sample longer than
            ``seq_len`` is an error (nothing is truncated).
        pad_to_multiple_of: round the row length up to a multiple of this (e.g. 8 or 64 for
            tensor cores / sequence parallelism). With ``seq_len`` given, ``seq_len`` must already
            be a multiple of it.

    Returns:
        ``tokens``/``position_ids``/``targets`` int64, ``loss_mask``/``behavior_logprobs``
        float32 ``[B, S]``, ``rewards`` float32 ``[B]``.

    Raises:
        ValueError: no samples; a sample (named by its index) with an empty prompt, a
            behaviour log-prob count different from its response length, a non-finite behaviour
            log-prob (named by its response token index), a non-finite reward, a non-integer or
            negative token id, or longer than ``seq_len``; bad ``pad_id`` / ``seq_len`` /
            ``pad_to_multiple_of``.
    """
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"samples must be a sequence of Sample, got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("build_train_batch needs at least one sample")
    if isinstance(pad_id, bool) or not _is_int(pad_id) or operator.index(pad_id) < 0:
        raise ValueError(f"pad_id must be a non-negative integer token id, got {pad_id!r}")
    pad_id = operator.index(pad_id)
    if (isinstance(pad_to_multiple_of, bool) or not _is_int(pad_to_multiple_of)
            or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be an integer >= 1, got {pad_to_multiple_of!r}")
    if seq_len is not None:
        if isinstance(seq_len, bool) or not _is_int(seq_len) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1 or None, got {seq_len!r}")
        if seq_len % pad_to_multiple_of:
            raise ValueError(f"seq_len={seq_len} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}")

    rows: list[tuple[list[int], int, int, torch.Tensor]] = []  # (tokens, prompt len, response len, logprobs)
    rewards: list[float] = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            raise ValueError(f"sample {index}: expected a Sample, got {type(sample).__name__}")
        prompt = _token_ids(sample.prompt_ids, "prompt_ids", index)
        response = _token_ids(sample.response_ids, "response_ids", index)
        if not prompt:
            raise ValueError(
                f"sample {index}: empty prompt; at least one prompt token is needed to predict "
                "the first response token"
            )
        if len(sample.behavior_logprobs) != len(response):
            raise ValueError(
                f"sample {index}: {len(sample.behavior_logprobs)} behaviour log-probs for "
                f"{len(response)} response tokens (need exactly one per response token)"
            )
        try:
            logprobs = torch.tensor([float(x) for x in sample.behavior_logprobs], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sample {index}: behavior_logprobs must be numbers ({e})") from None
        bad = ~torch.isfinite(logprobs)
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sample {index}: behaviour log-prob of response token {t} (token id {response[t]}) is "
                f"{float(sample.behavior_logprobs[t])} in float32; it must be finite"
            )
        try:
            reward = float(sample.reward)
        except (TypeError, ValueError):
            raise ValueError(f"sample {index}: reward must be a number, got {sample.reward!r}") from None
        if not math.isfinite(reward):
            raise ValueError(f"sample {index}: reward is {reward}; it must be finite")
        rows.append((prompt + response, len(prompt), len(response), logprobs))
        rewards.append(reward)

    longest = max(len(tokens) for tokens, *_ in rows)
    if seq_len is None:
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    else:
        for index, (tokens, p_len, r_len, _) in enumerate(rows):
            if len(tokens) > seq_len:
                raise ValueError(
                    f"sample {index} has {len(tokens)} tokens ({p_len} prompt + {r_len} response), "
                    f"more than seq_len={seq_len}; it is not truncated: raise seq_len or cap the "
                    "prompt length / max response tokens"
                )
        length = seq_len

    n = len(rows)
    tokens_t = torch.full((n, length), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((n, length), dtype=torch.float32)
    behavior = torch.zeros((n, length), dtype=torch.float32)
    for i, (tokens, p_len, r_len, logprobs) in enumerate(rows):
        tokens_t[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        # Position t predicts token t + 1: response token j sits at p_len + j, predicted at p_len + j - 1.
        start, stop = p_len - 1, p_len - 1 + r_len
        loss_mask[i, start:stop] = 1.0
        behavior[i, start:stop] = logprobs
    targets = torch.full_like(tokens_t, pad_id)
    targets[:, :-1] = tokens_t[:, 1:]
    batch: TrainBatch = {
        "tokens": tokens_t,
        "position_ids": torch.arange(length, dtype=torch.int64).expand(n, length).contiguous(),
        "targets": targets,
        "loss_mask": loss_mask,
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "behavior_logprobs": behavior,
    }
    validate_batch(batch)
    return batch


def count_loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """The number of masked-in (response) tokens of this batch: ``loss_mask.sum()``.

    A convenience for logging and sizing. It is not the ``Z`` of the loss: that is counted over
    the whole global batch by the trainer, and for RIFT excludes zero-reward samples.
    """
    if "loss_mask" not in batch:
        raise ValueError(f"batch has no 'loss_mask'; keys: {sorted(batch)}")
    return int((batch["loss_mask"] != 0).sum())

"""The training batch the Megatron step consumes, and how it is split.

A batch is a dict of tensors with a leading sample dimension:

    tokens             [B, S] int64   prompt + response ids, right-padded
    position_ids       [B, S] int64
    targets            [B, S] int64   tokens shifted left by one (the token each position predicts)
    loss_mask          [B, S] float   1 where `targets` is a response token, else 0
    rewards            [B]    float
    behavior_logprobs  [B, S] float   log mu(targets) of the sampling policy (0 where masked)

Splitting is by samples only: data-parallel ranks take contiguous shards of the global batch and
each shard is cut into micro-batches. Because the loss is normalised by the token count of the
whole global batch (computed once, before the schedule runs), the split never changes the loss or
its gradient (docs/objective.md property 4).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

BATCH_KEYS = ("tokens", "position_ids", "targets", "loss_mask", "rewards", "behavior_logprobs")
TrainBatch = dict[str, torch.Tensor]


def validate_batch(batch: Mapping[str, torch.Tensor]) -> int:
    """Check keys and shapes; return the number of samples."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"training batch is missing key(s) {missing}; expected {list(BATCH_KEYS)}")
    tokens = batch["tokens"]
    if tokens.dim() != 2:
        raise ValueError(f"batch['tokens'] must be [batch, seq], got shape {list(tokens.shape)}")
    for key in BATCH_KEYS:
        expected = tokens.shape[:1] if key == "rewards" else tokens.shape
        if batch[key].shape != expected:
            raise ValueError(
                f"batch[{key!r}] has shape {list(batch[key].shape)}, expected {list(expected)}"
            )
    return tokens.shape[0]


def select_samples(batch: Mapping[str, torch.Tensor], start: int, stop: int) -> TrainBatch:
    return {key: batch[key][start:stop] for key in BATCH_KEYS}


def shard_for_data_parallel(batch: Mapping[str, torch.Tensor], rank: int, size: int) -> TrainBatch:
    """This data-parallel rank's contiguous share of the global batch."""
    samples = validate_batch(batch)
    if samples % size:
        raise ValueError(f"global batch of {samples} samples does not split over {size} data-parallel ranks")
    per_rank = samples // size
    return select_samples(batch, rank * per_rank, (rank + 1) * per_rank)


def pad_sequences(batch: Mapping[str, torch.Tensor], multiple: int) -> TrainBatch:
    """The batch with its rows right-padded to a multiple of `multiple` tokens (sequence
    parallelism splits the sequence over TP ranks). Padding is out of the loss (mask 0) and, at
    the end of causal rows, changes nothing before it; positions continue counting."""
    seq = batch["tokens"].shape[1]
    extra = -seq % multiple
    if extra == 0:
        return dict(batch)
    padded = {}
    for key, value in batch.items():
        if key == "rewards":
            padded[key] = value
        elif key == "position_ids":
            tail = value[:, -1:] + torch.arange(1, extra + 1, dtype=value.dtype, device=value.device)
            padded[key] = torch.cat([value, tail], dim=1)
        else:
            padded[key] = torch.nn.functional.pad(value, (0, extra), value=0)
    return padded


def split_micro_batches(batch: Mapping[str, torch.Tensor], micro_batch_size: int) -> list[TrainBatch]:
    """Cut a (per-rank) batch into equal micro-batches of `micro_batch_size` samples."""
    samples = validate_batch(batch)
    if micro_batch_size < 1 or samples % micro_batch_size:
        raise ValueError(
            f"{samples} samples per data-parallel rank do not split into micro-batches of "
            f"{micro_batch_size}"
        )
    return [
        select_samples(batch, start, start + micro_batch_size)
        for start in range(0, samples, micro_batch_size)
    ]

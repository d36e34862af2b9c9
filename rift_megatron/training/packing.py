"""Micro-batches cut by a token budget (`training.max_tokens_per_micro_batch`) instead of a count.

Why: a rank's share of the global batch arrives right-padded to its longest sample, and equal-count
micro-batches compute on all of that padding (with 20..2000-token samples, most of the compute).
Here samples are sorted by length and grouped so that each micro-batch's padded size, its sample
count x its longest sample (rounded up to the sequence-parallel multiple), stays within the budget,
and each micro-batch is cut to its own longest sample.

Exactness: attention is causal and the padding sits at the end of each row, so cutting a row after
its last loss position changes nothing the loss sees (the output at position t depends on tokens
[0, t] only; its target is stored separately in `targets`). The loss is divided by global token
counts computed before the schedule (training/step.py) and Megatron's schedule, with
`calculate_per_token_loss`, neither divides by the number of micro-batches nor by a
micro-batch's own count, so the grouping changes the loss and its gradient only by fp32 summation
order. Which samples share a micro-batch is a deterministic function of the rank's data, so every
stage of a pipeline (they see the same data) builds the same micro-batches; data-parallel ranks may
build different numbers of them (Megatron reduces gradients once per step, after the last one).

Not with virtual pipeline stages: under Megatron-Core 0.16.1's interleaved schedule (PP2 x VPP2,
`variable_seq_lengths` on) a backward pass received a gradient of another micro-batch's shape
("Mismatch in shape: grad_output[0] has a shape of [14, 1, 128] and output[0] has a shape of
[22, 1, 128]"); the cause inside Megatron was not found. The config refuses the combination.

The packing is "next-fit decreasing": consecutive samples in length order share a micro-batch
while the budget holds. Under a padded cost (count x longest) a sample added to an earlier, wider
micro-batch pays that micro-batch's width; consecutive grouping pays only the gap to the next
longer sample, so it wastes less compute than first-fit for the same budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rift_megatron.training.batch import TrainBatch, validate_batch

__all__ = ["pack_by_tokens", "packed_micro_batches", "sample_lengths"]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def sample_lengths(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """How many positions of each row the model must see: through the row's last loss position
    (at least 1, for a sample without loss tokens, which then costs one position)."""
    mask = batch["loss_mask"] != 0
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return [max(int(last), 1) for last in (mask * positions).amax(dim=1).tolist()]


def pack_by_tokens(lengths: Sequence[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Sample indices of each micro-batch, longest samples first.

    Samples are taken in decreasing length (ties by index, so the result is deterministic) and
    added to the current micro-batch while (its samples + 1) x its padded width <= `max_tokens`,
    the width being its first (longest) sample's length rounded up to `multiple`. A sample whose
    own padded length exceeds the budget gets a micro-batch to itself. Every index appears once.
    """
    if max_tokens < 1 or multiple < 1:
        raise ValueError(f"max_tokens ({max_tokens}) and multiple ({multiple}) must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    width = 0
    for index in order:
        if groups and (len(groups[-1]) + 1) * width <= max_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
            width = _round_up(lengths[index], multiple)
    return groups


def packed_micro_batches(batch: Mapping[str, torch.Tensor], max_tokens: int, multiple: int = 1) -> list[TrainBatch]:
    """A (per-rank, already padded to `multiple`) batch as micro-batches of at most `max_tokens`
    padded tokens each (a longer sample alone), each cut to its own longest sample rounded up to
    `multiple`."""
    validate_batch(batch)
    lengths = sample_lengths(batch)
    groups = pack_by_tokens(lengths, max_tokens, multiple)
    micro_batches = []
    for group in groups:
        width = _round_up(max(lengths[i] for i in group), multiple)
        rows = torch.tensor(group, device=batch["tokens"].device)
        micro_batches.append(
            {key: value[rows] if value.dim() == 1 else value[rows, :width] for key, value in batch.items()}
        )
    return micro_batches

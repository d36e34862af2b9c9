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

How samples are grouped: sorted by length, cut into consecutive runs, each run a micro-batch
within the budget (count x padded width <= budget; a longer sample alone). Of all such cuts the one
with the least computed positions plus MICRO_BATCH_COST per micro-batch is taken (dynamic
programming over the sorted lengths). Without that per-micro-batch cost every sample would go
alone (no padding, but one tiny forward/backward per sample); without minimising, filling each
micro-batch up to the budget ("next-fit") groups the many short samples of a wide length mix
under one long width: 41% of the computed positions were padding on the benchmark's mix.
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


# A micro-batch's fixed cost (one more pass through the schedule, every layer's kernel launches),
# counted as this many positions of compute. A judgement, not a measurement: it only decides when
# short samples share a micro-batch padded to a slightly longer one rather than go alone.
MICRO_BATCH_COST = 128


def pack_by_tokens(lengths: Sequence[int], max_tokens: int, multiple: int = 1) -> list[list[int]]:
    """Sample indices of each micro-batch, longest samples first.

    Samples are taken in decreasing length (ties by index: the result is deterministic) and cut
    into consecutive runs with (run length) x (its first sample's length rounded up to
    `multiple`) <= `max_tokens`, a sample longer than that alone; of those cuts, the one with the
    fewest computed positions + MICRO_BATCH_COST per micro-batch. Every index appears once.
    """
    if max_tokens < 1 or multiple < 1:
        raise ValueError(f"max_tokens ({max_tokens}) and multiple ({multiple}) must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    widths = [_round_up(lengths[i], multiple) for i in order]
    # best[j]: (cost, start of the last run) of the cheapest cut of order[:j]
    best: list[tuple[float, int]] = [(0.0, 0)] + [(float("inf"), 0)] * len(order)
    for start, width in enumerate(widths):
        longest_run = max(1, max_tokens // width)
        for stop in range(start + 1, min(len(order), start + longest_run) + 1):
            cost = best[start][0] + (stop - start) * width + MICRO_BATCH_COST
            if cost < best[stop][0]:
                best[stop] = (cost, start)
    groups, stop = [], len(order)
    while stop:
        start = best[stop][1]
        groups.append(order[start:stop])
        stop = start
    return groups[::-1]


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

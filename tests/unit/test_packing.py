"""Packing micro-batches by length (rift_megatron/training/packing.py): the plan and the tensors.

The loss and gradients of packed vs unpacked training (TP1, DP2, TP2 with sequence parallelism,
TP2xPP2) are compared in tests/distributed/test_parallel_equivalence.py; here are the
properties of the plan itself and of the micro-batches cut from it.
"""

from __future__ import annotations

import random

import pytest
import torch

from rift_megatron.training.batch import pad_sequences
from rift_megatron.training.packing import pack_by_tokens, packed_micro_batches, sample_lengths
from tests.synthetic_batch import mixed_reward_batch


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_plan(groups: list[list[int]], lengths: list[int], budget: int, multiple: int) -> None:
    """Every sample exactly once; every group within the budget or a lone sample."""
    flat = [i for group in groups for i in group]
    assert sorted(flat) == list(range(len(lengths)))
    for group in groups:
        width = _round_up(max(lengths[i] for i in group), multiple)
        assert len(group) * width <= budget or len(group) == 1, (group, width, budget)


@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_plans_hold_every_sample_once_within_the_budget(multiple):
    rng = random.Random(5)
    for _ in range(200):
        lengths = [int(20 * 100 ** rng.random()) for _ in range(rng.randint(1, 40))]  # log-uniform 20..2000
        budget = rng.choice([64, 500, 2048, 8192])
        groups = pack_by_tokens(lengths, budget, multiple)
        _check_plan(groups, lengths, budget, multiple)
        assert groups == pack_by_tokens(list(lengths), budget, multiple)  # deterministic


def test_samples_are_grouped_longest_first_and_ties_by_index():
    assert pack_by_tokens([5, 9, 5, 2, 9], 18) == [[1, 4], [0, 2, 3]]
    assert pack_by_tokens([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]


def test_a_sample_longer_than_the_budget_gets_a_micro_batch_of_its_own():
    assert pack_by_tokens([30, 4, 50, 4], 20) == [[2], [0], [1, 3]]
    # the sequence-parallel multiple counts: 9 rounds to 10, two of them need 20
    assert pack_by_tokens([9, 9], 19, multiple=2) == [[0], [1]]
    assert pack_by_tokens([9, 9], 20, multiple=2) == [[0, 1]]


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        pack_by_tokens([3], 0)


@pytest.mark.parametrize("multiple", [1, 2])
def test_micro_batches_are_the_rows_cut_to_their_own_longest_sample(multiple):
    """Each micro-batch holds its samples' rows, unchanged up to the micro-batch's width (a
    multiple of `multiple`), and every loss position of the batch lies inside that width: the
    packed micro-batches carry exactly the unpacked batch's loss terms."""
    batch = pad_sequences(mixed_reward_batch(seed=7, shortest=4), multiple)
    lengths = sample_lengths(batch)
    assert min(lengths) == 1  # one sample has no loss tokens (it costs one position)
    budget = 40
    micro_batches = packed_micro_batches(batch, budget, multiple=multiple)
    groups = pack_by_tokens(lengths, budget, multiple)
    assert len(micro_batches) == len(groups) > 1
    assert len({tuple(mb["tokens"].shape) for mb in micro_batches}) > 1  # shapes really differ
    for group, mb in zip(groups, micro_batches, strict=True):
        rows, width = mb["tokens"].shape
        assert rows == len(group) and width % multiple == 0 and rows * width <= budget
        assert width == _round_up(max(lengths[i] for i in group), multiple)
        for key, value in mb.items():
            expected = batch[key][group] if value.dim() == 1 else batch[key][group, :width]
            assert torch.equal(value, expected), key
    assert sum(float(mb["loss_mask"].sum()) for mb in micro_batches) == float(batch["loss_mask"].sum())
    assert sum(mb["tokens"].numel() for mb in micro_batches) < batch["tokens"].numel()


def test_short_samples_are_not_padded_to_a_long_one_when_a_micro_batch_of_their_own_is_cheaper():
    """The cut minimises computed positions + MICRO_BATCH_COST (128) per micro-batch: three
    10-token samples beside a 100-token one cost 400 + 128 together, 100 + 30 + 2 x 128 apart;
    three 90-token samples cost 400 + 128 together, 100 + 270 + 2 x 128 apart."""
    assert pack_by_tokens([100, 10, 10, 10], 400) == [[0], [1, 2, 3]]
    assert pack_by_tokens([100, 90, 90, 90], 400) == [[0, 1, 2, 3]]

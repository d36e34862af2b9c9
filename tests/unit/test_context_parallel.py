"""The context-parallel batch split (training/context_parallel.py) and the padding it needs: every
position on exactly one rank, Megatron's load-balanced chunk order, all per-token tensors split
alike, per-sample ones kept whole, and data-parallel sizes that count CP. The split's agreement with
Megatron's own `get_batch_on_this_cp_rank` and the loss over a real CP group are checked in
tests/distributed/test_vocab_parallel_logprobs.py (world 2)."""

from __future__ import annotations

import pytest
import torch

from rift_megatron.parallel import ParallelConfigError, ParallelLayout
from rift_megatron.training.batch import BATCH_KEYS, pad_sequences
from rift_megatron.training.context_parallel import context_parallel_positions, context_parallel_share


@pytest.mark.parametrize("cp, seq", [(1, 5), (2, 8), (2, 12), (3, 18), (4, 16)])
def test_every_position_on_exactly_one_rank(cp, seq):
    shares = [context_parallel_positions(seq, cp, r) for r in range(cp)]
    assert all(len(s) == seq // cp for s in shares)
    assert sorted(torch.cat(shares).tolist()) == list(range(seq))


def test_load_balanced_order_rank_r_takes_chunks_r_and_2cp_minus_1_minus_r():
    assert context_parallel_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    # CP4, 16 positions, chunks of 2: rank 1 holds chunks 1 and 6
    assert context_parallel_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    # causal cost of a position is its index + 1: every rank's share costs the same
    costs = [int((context_parallel_positions(16, 4, r) + 1).sum()) for r in range(4)]
    assert len(set(costs)) == 1, costs


def test_unpadded_length_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match="sequence length 6 is not a multiple of 2 x parallel.context = 4"):
        context_parallel_positions(6, 2, 0)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        context_parallel_positions(8, 2, 2)


def _batch(samples: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 50, (samples, seq), generator=g)
    mask = torch.ones(samples, seq)
    mask[:, :2] = 0
    return {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(samples, seq).clone(),
        "targets": torch.roll(tokens, -1, dims=1),
        "loss_mask": mask,
        "rewards": torch.tensor([1.0, -0.5, 0.25])[:samples],
        "behavior_logprobs": -torch.rand(samples, seq, generator=g),
    }


@pytest.mark.parametrize("layout", [ParallelLayout(context=2), ParallelLayout(tensor=2, sequence_parallel=True, context=2)])
def test_padding_then_split_keeps_every_token_once_and_all_keys_aligned(layout):
    """A 7-token batch padded to the layout's multiple (2 x CP, x TP with sequence parallelism),
    then split: the shares put back together by position give the padded batch; the padding is
    out of the loss; rewards are whole on every rank; positions travel with their tokens."""
    assert layout.sequence_multiple == 4 * (2 if layout.sequence_parallel else 1)
    batch = _batch(3, 7)
    padded = pad_sequences(batch, layout.sequence_multiple)
    seq = padded["tokens"].shape[1]
    assert seq == layout.sequence_multiple * -(-7 // layout.sequence_multiple)
    assert not padded["loss_mask"][:, 7:].any()
    rebuilt = {k: torch.zeros_like(v) for k, v in padded.items() if k != "rewards"}
    for rank in range(layout.context):
        share = context_parallel_share(padded, layout.context, rank)
        assert set(share) == set(BATCH_KEYS)
        assert torch.equal(share["rewards"], padded["rewards"])
        positions = context_parallel_positions(seq, layout.context, rank)
        assert torch.equal(share["position_ids"][0], positions)  # RoPE positions follow the tokens
        if layout.sequence_parallel:  # each rank's share still splits over the TP ranks
            assert share["tokens"].shape[1] % layout.tensor == 0
        for key in rebuilt:
            rebuilt[key][:, positions] = share[key]
    for key in rebuilt:
        assert torch.equal(rebuilt[key], padded[key]), key
    assert int(padded["loss_mask"].sum()) == int(batch["loss_mask"].sum())


def test_cp1_is_the_batch_itself_and_mismatched_lengths_are_refused():
    batch = _batch(2, 6)
    assert all(torch.equal(v, batch[k]) for k, v in context_parallel_share(batch, 1, 0).items())
    bad = dict(_batch(2, 8), behavior_logprobs=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="batch\\['behavior_logprobs'\\] has 6 positions, batch has 8"):
        context_parallel_share(bad, 2, 0)


def test_data_parallel_size_is_world_over_tp_pp_cp():
    assert ParallelLayout(tensor=2, context=2).data_parallel_size(8) == 2
    assert ParallelLayout(context=2).sequence_multiple == 4
    assert ParallelLayout().sequence_multiple == 1
    with pytest.raises(ParallelConfigError, match=r"tensor \(2\) x pipeline \(1\) x context \(2\) = 4"):
        ParallelLayout(tensor=2, context=2).data_parallel_size(6)

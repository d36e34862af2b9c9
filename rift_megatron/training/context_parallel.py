"""This context-parallel rank's share of a batch's sequence dimension (Megatron-LM's get_batch).

Why this split: under causal attention a token attends to all tokens before it, so the last part
of a sequence costs the most. Megatron cuts each (padded) sequence into 2 x CP equal chunks and
gives rank r chunks r and 2 x CP - 1 - r, so every rank gets one cheap and one expensive chunk
(`megatron.core.utils.get_batch_on_this_cp_rank`; its ring attention assumes exactly this order).
Every per-token tensor of a training batch is split alike (tokens, position_ids, targets,
loss_mask, behavior_logprobs); per-sample ones (rewards) are kept whole. The split is computed
here from (CP size, CP rank) alone, so it can be tested without a process group.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PER_SAMPLE_KEYS = ("rewards",)


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The sequence positions (int64, ascending) rank `cp_rank` of `cp_size` holds."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} of size {cp_size} is not a valid rank")
    if seq_len % (2 * cp_size) and cp_size > 1:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2 x parallel.context = {2 * cp_size}: pad the batch "
            "to the layout's sequence_multiple first"
        )
    if cp_size == 1:
        return torch.arange(seq_len)
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def context_parallel_share(batch: Mapping[str, torch.Tensor], cp_size: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """`batch` with every [B, S, ...] tensor cut to this rank's positions (dim 1); per-sample
    tensors unchanged. CP size 1 returns the batch as it is."""
    if cp_size == 1:
        return dict(batch)
    seq_len = next(v.shape[1] for k, v in batch.items() if k not in PER_SAMPLE_KEYS)
    positions = context_parallel_positions(seq_len, cp_size, cp_rank)
    share = {}
    for key, value in batch.items():
        if key in PER_SAMPLE_KEYS:
            share[key] = value
        elif value.shape[1] != seq_len:
            raise ValueError(f"batch[{key!r}] has {value.shape[1]} positions, batch has {seq_len}")
        else:
            share[key] = value.index_select(1, positions.to(value.device))
    return share

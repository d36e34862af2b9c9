"""The weight push's shard path: each rank receives only what its own vLLM worker loads.

Used when the trainer's tensor-parallel size equals the engine's (R): Megatron's TP rank t and the
vLLM worker of global rank `t mod R` then hold the same slice of every tensor-parallel layer
(the same query groups and heads, the same FFN columns; o_proj / down_proj split on the input
dimension on both sides). So the trainer's local shard converts to the worker's local shard
without any tensor-parallel gather:
  * fused QKV: each rank holds whole query groups ([q heads; k; v] per group), split into the
    local q / k / v rows with the conversion table's own `to_hf` on a per-rank architecture;
  * SwiGLU `linear_fc1`: each rank holds [gate_t; up_t], split in two;
  * vocabulary rows: Megatron pads the vocabulary to a multiple of lcm(128, TP), vLLM to a
    multiple of 64, so rank t's rows differ on the two sides; the few rows a worker needs from a
    neighbour arrive by point-to-point exchange within the TP group (padding never leaves);
  * norms are replicated and need nothing.
Layers of other pipeline stages arrive as these local shards, broadcast over the pipeline group
(whose ranks share the TP rank). Bytes received per rank: at most model bytes / R (the floor),
plus a vocabulary boundary exchange; the gather path receives the whole model on every rank.

vLLM's reload path takes full-shaped HF tensors and narrows each to the worker's slice (its
`weight_loader`); on the CPU it then repacks the weights, which is why the shard is not copied
into the worker's parameters directly. Each local shard is therefore placed, on this rank,
into a full-shaped tensor at exactly the rows / columns that loader reads, the rest NaN (a
misplaced shard shows up as non-finite log-probs, never as plausible weights). That copy is
local memory traffic; the bucket peak is the same as the gather path's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rift_megatron.convert.mapping import FusedGateUp, FusedQKV, ParamMapping, VocabRows, expand
from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.models.provider import padded_vocab_size
from rift_megatron.platform import current_platform


@dataclass
class Traffic:
    """Bytes this rank received in the push's collectives (what the benchmark reports)."""

    received: int = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.received += tensor.numel() * tensor.element_size()


def engine_vocab_rows(arch: ModelArchitecture, rank: int, size: int) -> tuple[int, int]:
    """The HF vocabulary rows [start, stop) vLLM's tensor-parallel rank `rank` of `size` loads
    (vLLM's `VocabParallelEmbedding`: vocabulary padded to its padding multiple, split evenly,
    padding rows clipped)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        DEFAULT_VOCAB_PADDING_SIZE,
        pad_vocab_size,
        vocab_range_from_global_vocab_size,
    )

    start, stop = vocab_range_from_global_vocab_size(pad_vocab_size(arch.vocab_size, DEFAULT_VOCAB_PADDING_SIZE), rank, size)
    return min(start, arch.vocab_size), min(stop, arch.vocab_size)


def trainer_vocab_rows(arch: ModelArchitecture, rank: int, size: int) -> tuple[int, int]:
    """The (padded) vocabulary rows Megatron's tensor-parallel rank `rank` of `size` holds."""
    rows = padded_vocab_size(arch.vocab_size, size) // size
    return rank * rows, (rank + 1) * rows


def local_shapes(mapping: ParamMapping, arch: ModelArchitecture, partition_dim: int | None, rank: int, size: int) -> list[tuple]:
    """Shapes of the worker-local HF shards of one parameter for TP rank `rank`."""
    shapes = []
    for shape in mapping.hf_shapes(arch):
        shape = list(shape)
        if isinstance(mapping, VocabRows):
            start, stop = engine_vocab_rows(arch, rank, size)
            shape[0] = stop - start
        elif partition_dim is not None:
            shape[partition_dim] //= size
        shapes.append(tuple(shape))
    return shapes


def _rank_arch(arch: ModelArchitecture, size: int) -> ModelArchitecture:
    """The architecture one TP rank's attention shard looks like (its heads and query groups)."""
    return dataclasses.replace(arch, num_attention_heads=arch.num_attention_heads // size,
                               num_kv_heads=arch.num_kv_heads // size)


def _vocab_shard(local: torch.Tensor, arch: ModelArchitecture, tp_group, traffic: Traffic) -> torch.Tensor:
    """Rows `engine_vocab_rows` of this rank from the trainer's vocabulary shards of the TP group:
    local rows copied, a neighbour's rows received point to point (collective over `tp_group`)."""
    rank, size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    start, stop = engine_vocab_rows(arch, rank, size)
    out = local.new_empty((stop - start, local.shape[1]))
    ops, received = [], []
    for peer in range(size):
        # rows the peer's worker needs from this rank, and rows this rank's worker needs from the peer
        send = _overlap(trainer_vocab_rows(arch, rank, size), engine_vocab_rows(arch, peer, size))
        recv = _overlap(trainer_vocab_rows(arch, peer, size), (start, stop))
        mine = trainer_vocab_rows(arch, rank, size)[0]
        if peer == rank:
            if recv:
                out[recv[0] - start:recv[1] - start] = local[recv[0] - mine:recv[1] - mine]
            continue
        peer_global = dist.get_global_rank(tp_group, peer)
        if send:
            ops.append(dist.P2POp(dist.isend, local[send[0] - mine:send[1] - mine].contiguous(), peer_global, tp_group))
        if recv:
            buffer = out.new_empty((recv[1] - recv[0], out.shape[1]))
            received.append((recv, buffer))
            ops.append(dist.P2POp(dist.irecv, buffer, peer_global, tp_group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for (begin, end), buffer in received:
        out[begin - start:end - start] = buffer
        traffic.add(buffer)
    return out


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    begin, end = max(a[0], b[0]), min(a[1], b[1])
    return (begin, end) if begin < end else None


def worker_shards(mapping: ParamMapping, local: torch.Tensor, arch: ModelArchitecture, tp_group,
                  traffic: Traffic) -> list[torch.Tensor]:
    """This TP rank's Megatron shard of one parameter as the worker-local HF shards (collective
    over `tp_group` for vocabulary rows only)."""
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if isinstance(mapping, VocabRows):
        return [_vocab_shard(local, arch, tp_group, traffic) if size > 1 else local[: arch.vocab_size]]
    return local_hf_shards(mapping, local, arch, size)


def local_hf_shards(mapping: ParamMapping, local: torch.Tensor, arch: ModelArchitecture, size: int) -> list[torch.Tensor]:
    """A TP rank's Megatron shard of a non-vocabulary parameter as its HF shards (no communication)."""
    if isinstance(mapping, (FusedQKV, FusedGateUp)):
        return mapping.to_hf(local, _rank_arch(arch, size))
    return mapping.to_hf(local, arch)


def full_shaped(shard: torch.Tensor, hf_shape: tuple, mapping: ParamMapping, arch: ModelArchitecture,
                partition_dim: int | None, rank: int, size: int) -> torch.Tensor:
    """`shard` placed where vLLM's loader for TP rank `rank` reads it in a full HF-shaped tensor
    (NaN elsewhere); a replicated tensor is returned as it is."""
    if isinstance(mapping, VocabRows):
        dim, start = 0, engine_vocab_rows(arch, rank, size)[0]
    elif partition_dim is None or size == 1:
        return shard
    else:
        dim, start = partition_dim, rank * shard.shape[partition_dim]
    if tuple(shard.shape) == tuple(hf_shape):
        return shard
    full = torch.full(hf_shape, float("nan"), dtype=shard.dtype, device=shard.device)
    full.narrow(dim, start, shard.shape[dim]).copy_(shard)
    return full


def sharded_hf_weights(local: dict[str, torch.nn.Parameter], owners: dict, arch: ModelArchitecture,
                       traffic: Traffic) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full-shaped tensor holding this rank's worker slice) for every HF tensor, in
    table order (collective over the TP and pipeline groups). `local`: this rank's parameters by
    checkpoint name; `owners`: name -> `Owner` (the same on every rank)."""
    from megatron.core import parallel_state as ps

    pp_group, tp_group = ps.get_pipeline_model_parallel_group(), ps.get_tensor_model_parallel_group()
    pp_size, my_stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for mapping in expand(arch):
        owner = owners[mapping.megatron]
        if owner.stage == my_stage:
            shards = worker_shards(mapping, local[mapping.megatron].detach(), arch, tp_group, traffic)
        else:
            shards = [torch.empty(shape, dtype=owner.dtype, device=current_platform().device())
                      for shape in local_shapes(mapping, arch, owner.partition_dim, tp_rank, tp_size)]
        if pp_size > 1:
            src = dist.get_global_rank(pp_group, owner.stage)
            for index, shard in enumerate(shards):
                shards[index] = shard = shard.contiguous()
                dist.broadcast(shard, src=src, group=pp_group)
                if owner.stage != my_stage:
                    traffic.add(shard)
        for name, shard, hf_shape in zip(mapping.hf, shards, mapping.hf_shapes(arch)):
            yield name, full_shaped(shard, hf_shape, mapping, arch, owner.partition_dim, tp_rank, tp_size)

"""Where each Megatron parameter lives in a `dist_checkpointing` (torch_dist) checkpoint.

Rather than re-deriving Megatron's on-disk layout (stacked layer axis, TE-style key names for
the local spec, SwiGLU gate/up stored as two chunks, `_extra_state` objects), we ask Megatron:
a TP1 `GPTModel` is built on the meta device (no memory, instant even at 70B) and its
`sharded_state_dict()` says, per parameter, the checkpoint key, global shape and offsets. That is
exactly what a trainer at any TP/PP layout will look up when it loads, so a checkpoint written
from this layout loads everywhere by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.models.param_names import checkpoint_name
from rift_megatron.models.provider import GPTModelProvider


@dataclass(frozen=True)
class StoredChunk:
    """One tensor chunk on disk: `key` at `offsets` with `sizes`, cut from parameter `param`."""

    param: str
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]


@dataclass(frozen=True)
class StoredObject:
    """A pickled non-tensor entry (`_extra_state`) Megatron expects next to the tensors."""

    param: str
    unique_key: str
    data: object


def sharded_model_state(arch: ModelArchitecture) -> dict:
    """The TP1 model's sharded state dict, keyed by checkpoint names (`param_names.py`), built
    on the meta device with the local layers on every machine (nothing is allocated, CPU or
    GPU). Needs Megatron parallel state initialised with TP1/PP1 (any data-parallel size)."""
    with torch.device("meta"):
        model = GPTModelProvider.for_checkpoint_layout(arch)()
    return {checkpoint_name(model, name): value for name, value in model.sharded_state_dict().items()}


def _sharded_tensors(sharded) -> Iterator:
    """The ShardedTensors a state-dict value stands for (a factory expands into several)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, ShardedTensorFactory):
        built = sharded.build_fn(sharded.key, sharded.data, sharded.replica_id, sharded.flattened_range)
        values = built.values() if isinstance(built, dict) else built
        for value in values:
            yield from _sharded_tensors(value)
    elif isinstance(sharded, ShardedTensor):
        yield sharded


def _chunk(param: str, sharded) -> StoredChunk:
    prepend = (1,) * sharded.prepend_axis_num
    return StoredChunk(
        param=param,
        key=sharded.key,
        offsets=tuple(sharded.global_offset),
        sizes=prepend + tuple(sharded.local_shape),
        global_shape=tuple(sharded.global_shape),
    )


def stored_layout(state: dict) -> tuple[dict[str, list[StoredChunk]], list[StoredObject]]:
    """Per parameter name, its chunks on disk; plus the objects stored beside them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    chunks: dict[str, list[StoredChunk]] = {}
    objects: list[StoredObject] = []
    for param, sharded in state.items():
        if isinstance(sharded, ShardedObject):
            objects.append(StoredObject(param, sharded.unique_key, sharded.data))
            continue
        pieces = [_chunk(param, piece) for piece in _sharded_tensors(sharded)]
        if pieces:
            chunks[param] = pieces
    return chunks, objects


def param_region(pieces: list[StoredChunk]):
    """The box of the stored tensor that holds one whole TP1 parameter.

    A TP1 parameter's chunks tile one contiguous box (one layer of a stacked tensor; for SwiGLU
    the gate and up halves one above the other), in the parameter's own row order.
    """
    from rift_megatron.convert.dcp_reader import Region

    first = pieces[0]
    low = [min(p.offsets[d] for p in pieces) for d in range(len(first.offsets))]
    high = [max(p.offsets[d] + p.sizes[d] for p in pieces) for d in range(len(first.offsets))]
    sizes = tuple(h - l for l, h in zip(low, high))
    volume = sum(_volume(p.sizes) for p in pieces)
    if volume != _volume(sizes) or any(p.key != first.key for p in pieces):
        raise RuntimeError(f"chunks of {first.param} do not tile one box of {first.key}")
    return Region(first.key, tuple(low), sizes)


def _volume(sizes) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total

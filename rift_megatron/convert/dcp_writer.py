"""Write a Megatron `torch_dist` checkpoint one tensor at a time.

`megatron.core.dist_checkpointing.save` needs every tensor of the state dict in memory at once,
which for a 70B model is the whole model. The torch_dist format underneath is PyTorch
Distributed Checkpoint (DCP), whose writer asks its planner for each item's data only when it
writes that item. So we declare all chunks up front (key, offsets, sizes, dtype: known from the
layout) and produce each one on demand: peak memory is one parameter, not the model. Megatron's
own loader then reads the result like any checkpoint it wrote (tested at TP1/TP2/PP2/TP2xPP2).

With several processes (`--nproc`), each rank declares and produces its own share of the chunks
and DCP merges the plans into one checkpoint.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.convert.errors import ConversionError
from torch.distributed.checkpoint import FileSystemWriter, save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

# What megatron.core.dist_checkpointing writes to metadata.json for a torch_dist checkpoint.
MEGATRON_CHECKPOINT_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class LazyChunk:
    """A tensor chunk to write: where it goes, and how to compute it when its turn comes."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class LazyObject:
    """A non-tensor entry, pickled the way Megatron stores ShardedObjects."""

    unique_key: str
    data: object


class _OnDemandPlanner(DefaultSavePlanner):
    """A DCP save planner whose state dict is a list of promises instead of tensors."""

    def __init__(self, chunks: Sequence[LazyChunk], objects: Sequence[LazyObject]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}
        self._objects = {MetadataIndex(o.unique_key): o for o in objects}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        super().set_up_planner({}, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for index, c in self._chunks.items()
        ]
        items += [WriteItem(index=index, type=WriteItemType.BYTE_IO) for index in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self._objects[write_item.index].data], buffer)
            buffer.seek(0)
            return buffer
        chunk = self._chunks[write_item.index]
        data = chunk.produce()
        if tuple(data.shape) != chunk.sizes or data.dtype != chunk.dtype:
            raise RuntimeError(
                f"chunk {chunk.key}@{chunk.offsets}: produced {tuple(data.shape)} {data.dtype}, "
                f"declared {chunk.sizes} {chunk.dtype}"
            )
        return data.contiguous()


def write_megatron_checkpoint(directory: Path, chunks: Sequence[LazyChunk], objects: Sequence[LazyObject]) -> None:
    """Collectively write a torch_dist checkpoint Megatron's `dist_checkpointing.load` reads.

    Every rank of the default process group calls this with its own share; rank 0 also writes
    the common state and metadata.json (written last: Megatron treats a directory without it as
    not a checkpoint).
    """
    directory.mkdir(parents=True, exist_ok=True)
    # per_thread_copy_ahead=0: DCP's default overlapping loader stages through a CUDA stream
    # whenever CUDA is available, which would create a CUDA context (GPU memory) on a GPU node;
    # our chunks are produced on the CPU, so the serial loader is the right one everywhere.
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    try:
        save(
            {},
            storage_writer=writer,
            planner=_OnDemandPlanner(chunks, objects),
            no_dist=not dist.is_initialized() or dist.get_world_size() == 1,
        )
    except CheckpointException as error:
        # DCP wraps what a chunk's producer raised (a bad input found mid-write, e.g. an fp16
        # overflow); surface the user's error itself, not DCP's multi-rank report.
        for failure in error.failures.values():
            original = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(original, ConversionError):
                raise original from None
        raise
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({}, directory / "common.pt")
        (directory / "metadata.json").write_text(json.dumps(MEGATRON_CHECKPOINT_CONFIG))
    if dist.is_initialized():
        dist.barrier()

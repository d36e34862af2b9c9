"""Read arbitrary regions of tensors from a `torch_dist` checkpoint, one region at a time.

Megatron's `dist_checkpointing.load` is built for a full model on every rank (it validates that
the ranks together cover every stored tensor), while an exporter wants one layer of a stacked
tensor at a time. PyTorch Distributed Checkpoint can read any region: we plan reads of exactly
the requested boxes; each stored chunk overlapping a box is read and copied into it.
Metadata is unpickled through the allow-list of `rift_megatron.trust.unpickle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from rift_megatron.trust.unpickle import RestrictedFileSystemReader


@dataclass(frozen=True)
class Region:
    """The box [offsets, offsets + sizes) of stored tensor `key`."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class _RegionLoadPlanner(DefaultLoadPlanner):
    def __init__(self, targets: dict[MetadataIndex, torch.Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._targets = targets

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        super().set_up_planner({}, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for index, target in self._targets.items():
            box = ChunkStorageMetadata(offsets=index.offset, sizes=target.shape)
            items += create_read_items_for_chunk_list(index.fqn, self.metadata.state_dict_metadata[index.fqn], [box])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._targets[MetadataIndex(index.fqn, index.offset)]


def read_metadata(checkpoint: Path) -> Metadata:
    return RestrictedFileSystemReader(str(checkpoint)).read_metadata()


def read_regions(checkpoint: Path, regions: Sequence[Region], dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """The requested regions as tensors of the given dtypes (the stored dtype for exact bits)."""
    targets = {
        MetadataIndex(region.key, torch.Size(region.offsets)): torch.empty(region.sizes, dtype=dtype)
        for region, dtype in zip(regions, dtypes)
    }
    load({}, storage_reader=RestrictedFileSystemReader(str(checkpoint)), planner=_RegionLoadPlanner(targets), no_dist=True)
    return list(targets.values())

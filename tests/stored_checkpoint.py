"""Read back what a torch_dist checkpoint stores, tensor by tensor, whole (independent of Megatron)."""

from __future__ import annotations

from pathlib import Path

import torch


def stored_tensors(checkpoint: Path, optimizer: bool = False) -> dict[str, torch.Tensor]:
    """Every stored model tensor of `checkpoint`, plus the optimizer's when `optimizer`."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from rift_megatron.convert.dcp_reader import Region, read_metadata, read_regions

    stored = {key: value for key, value in read_metadata(checkpoint).state_dict_metadata.items()
              if (optimizer or not key.startswith("optimizer.")) and isinstance(value, TensorStorageMetadata)}
    regions = [Region(key, (0,) * len(value.size), tuple(value.size)) for key, value in stored.items()]
    return dict(zip(stored, read_regions(checkpoint, regions, [value.properties.dtype for value in stored.values()])))

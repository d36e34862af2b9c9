"""Model weights in Megatron's `dist_checkpointing` (torch_dist) format.

A checkpoint written at one TP/PP/VPP layout loads at any other: the sharded state dict names
every tensor by its global key and offset, and the chunks of a virtual pipeline are merged into
one flat container so the on-disk structure does not depend on the layout either. Writes go to a
temporary directory that is renamed into place, so a crash never leaves a half-written
checkpoint that looks complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def _sharded_model_state(chunks: list[torch.nn.Module]) -> dict:
    # Keys of the container are positional ("chunk0", ...) but dist_checkpointing matches tensors
    # by their ShardedTensor key (global layer index included), so any chunking loads any other.
    return {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}


def save_model_checkpoint(
    chunks: list[torch.nn.Module], directory: str | Path, hf_assets: str | Path | None = None
) -> Path:
    """Collectively save the unwrapped model chunks of every rank to `directory` (atomic).

    `hf_assets` (a folder with the model's config.json and tokenizer files, as written by
    `rift convert hf-to-mcore`) is copied in, so `rift convert mcore-to-hf` can export the
    checkpoint without being told what model it holds.
    """
    from megatron.core import dist_checkpointing

    from rift_megatron.convert.checkpoint_files import HF_ASSETS, copy_hf_assets
    from rift_megatron.staging import replace_directory

    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if hf_assets is not None:
            copy_hf_assets(Path(hf_assets), staging / HF_ASSETS)
    dist.barrier()
    dist_checkpointing.save(_sharded_model_state(chunks), str(staging))
    dist.barrier()
    if dist.get_rank() == 0:
        replace_directory(staging, directory)
    dist.barrier()
    return directory


def load_model_checkpoint(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Collectively load `directory` into this rank's unwrapped model chunks (any saved layout)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a dist_checkpointing checkpoint (no metadata.json)")
    loaded = dist_checkpointing.load(_sharded_model_state(chunks), str(directory))
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{index}"])

"""Checks before the first step that the run can save what it trains (a write probe and a
free-space estimate of `checkpoint.dir`): a run that would fail at its first checkpoint, hours in,
is refused at start in one line instead.

The estimate is the bytes a checkpoint of this model holds: the weights in the model's dtype,
the optimizer's fp32 master copy (bf16 / fp16 models, and every model under the distributed
optimizer, which saves its fp32 shard of the parameters) and Adam's two fp32 moments: 16 bytes
per parameter with the distributed optimizer in fp32, 14 in bf16 (Megatron-LM's 18 bytes per
parameter of the training state less the fp32 gradients, which are not saved); tokenizer files,
RNG states and metadata are small next to it. A new checkpoint is written before the oldest is pruned, so one
checkpoint's worth of free space is needed on top of what is there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.config import ConfigError
from rift_megatron.parallel import all_reduce_sum, is_main_rank

ADAM_MOMENT_BYTES = 8      # exp_avg + exp_avg_sq, fp32
MASTER_COPY_BYTES = 4      # fp32 main params (bf16 / fp16 models, or the distributed optimizer)
HEADROOM = 1.10            # estimate x this must be free


def checkpoint_bytes(parameters: int, weight_bytes: int, distributed_optimizer: bool) -> int:
    """Estimated bytes of one training checkpoint of a model of `parameters` parameters."""
    master = MASTER_COPY_BYTES if weight_bytes < 4 or distributed_optimizer else 0
    return parameters * (weight_bytes + master + ADAM_MOMENT_BYTES)


def model_parameters(chunks: list[torch.nn.Module], model_parallel_group) -> tuple[int, int]:
    """(parameters of the whole model, bytes per weight): this rank's shard summed over the
    tensor / pipeline ranks (data-parallel replicas are saved once)."""
    local = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    weight_bytes = next(p.element_size() for chunk in chunks for p in chunk.parameters())
    total = torch.tensor([float(local)], dtype=torch.float64)
    all_reduce_sum(total, group=model_parallel_group)
    return int(total.item()), weight_bytes


def check_checkpoint_dir(directory: str | Path, needed_bytes: int) -> None:
    """Raise ConfigError (one line naming `checkpoint.dir`) on every rank when it cannot be
    created or written, or holds less free space than one checkpoint needs. Global rank 0 checks
    (the directory must be on a file system every rank sees) and tells the others."""
    problem = _checkpoint_dir_problem(Path(directory), needed_bytes) if is_main_rank() else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [problem]
        dist.broadcast_object_list(holder, src=0)
        problem = holder[0]
    if problem:
        raise ConfigError(problem)


def _checkpoint_dir_problem(directory: Path, needed_bytes: int) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe.{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"rift")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        return (f"checkpoint.dir {str(directory)!r} is not writable ({error.strerror or error}): "
                "choose another directory or fix its permissions")
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * HEADROOM:
        return (f"checkpoint.dir {str(directory)!r} has {free / 2**30:.2f} GiB free, one checkpoint of this model "
                f"needs ~{needed_bytes / 2**30:.2f} GiB (+10%): free space or choose another directory")
    return None

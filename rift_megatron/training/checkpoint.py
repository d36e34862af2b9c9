"""Checkpoints in Megatron's `dist_checkpointing` (torch_dist) format, loadable at any layout.

Model-only checkpoints (`save_model_checkpoint`) hold the weights; training checkpoints
(`save_training_checkpoint`) add the optimizer (by default per parameter in the model's own
sharding, so a run can resume at another TP / PP / DP layout), the LR scheduler, every RNG state, the trainer's
counters and sampler position, and the resolved config.

A run directory looks like

    <run>/iter_0000010/   metadata.json, .metadata, *.distcp, common.pt   (model + optimizer)
                          trainer_state.json, config.yaml, hf_assets/, rng/rank_00000.pt ...
    <run>/latest          "iter_0000010": written last, after the directory is complete

Every checkpoint is written into a hidden staging directory and renamed into place, and `latest`
is replaced atomically after that, so a crash mid-write leaves the previous checkpoint current.
With a background writer (checkpoint_writer.py) the rename and `latest` wait until every rank's
write is complete.
The last file written before the rename is `rift_checksums.json` (every file's sha256); loads
check it and unpickle nothing but data (rift_megatron/trust/).
The chunks of a virtual pipeline are merged into one container and tensors are matched by their
global keys, so the on-disk structure does not depend on the layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import torch.distributed as dist

from rift_megatron.platform import current_platform
from rift_megatron.training.checkpoint_writer import CheckpointWriter

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
RNG_DIR = "rng"
ITERATION_PREFIX = "iter_"


def _sharded_model_state(chunks: list[torch.nn.Module]) -> dict:
    # Keys of the container are positional ("chunk0", ...) but dist_checkpointing matches tensors
    # by their ShardedTensor key (global layer index included), so any chunking loads any other.
    return {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _staging_for(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.partial")


def _save_sharded(sharded: dict, directory: Path, rank0_files=None, every_rank_files=None, after_rename=None,
                  writer: CheckpointWriter | None = None) -> Path:
    """Collective: stage, add files (rank 0 / every rank), write the sharded state with `writer`
    (default: synchronous), then, once every rank's write is complete, rename into place and run
    `after_rename` on rank 0 (e.g. move the `latest` pointer). With an asynchronous writer the
    returned directory appears only at its `poll` / `wait`."""
    from rift_megatron.convert.checkpoint_files import HF_ASSETS
    from rift_megatron.staging import replace_directory
    from rift_megatron.trust.checksums import write_checksums

    writer = writer or CheckpointWriter()
    staging = _staging_for(directory)
    writer.wait()  # a pending write of the same directory must not land in the fresh staging dir
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if rank0_files is not None:
            rank0_files(staging)
    _barrier()
    if every_rank_files is not None:
        every_rank_files(staging)

    def finalize() -> None:  # after Megatron's own finalize steps (.metadata, metadata.json)
        if _rank() == 0:
            write_checksums(staging, unlisted=(HF_ASSETS,))
            replace_directory(staging, directory)
            if after_rename is not None:
                after_rename()
        _barrier()

    writer.save(sharded, staging, finalize)
    return directory


def _copy_assets(hf_assets: str | Path | None):
    def write(staging: Path) -> None:
        if hf_assets is not None:
            from rift_megatron.convert.checkpoint_files import HF_ASSETS, copy_hf_assets

            copy_hf_assets(Path(hf_assets), staging / HF_ASSETS)

    return write


def save_model_checkpoint(
    chunks: list[torch.nn.Module], directory: str | Path, hf_assets: str | Path | None = None
) -> Path:
    """Collectively save the unwrapped model chunks of every rank to `directory` (atomic).

    `hf_assets` (a folder with the model's config.json and tokenizer files, as written by
    `rift convert hf-to-mcore`) is copied in, so `rift convert mcore-to-hf` can export the
    checkpoint without being told what model it holds.
    """
    return _save_sharded(_sharded_model_state(chunks), Path(directory), _copy_assets(hf_assets))


def load_model_checkpoint(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Collectively load `directory` into this rank's unwrapped model chunks (any saved layout)."""
    from rift_megatron.trust.admission import load_megatron_checkpoint

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a dist_checkpointing checkpoint (no metadata.json)")
    loaded = load_megatron_checkpoint(_sharded_model_state(chunks), directory)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{index}"])


# ---- training checkpoints ----------------------------------------------------------------------


def iteration_name(step: int) -> str:
    return f"{ITERATION_PREFIX}{step:07d}"


def rng_states() -> dict:
    """This rank's RNG states: python, numpy, torch, and Megatron's tensor-parallel tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if current_platform().is_cuda:
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and current_platform().is_cuda:
        torch.cuda.set_rng_state(states["cuda"])


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


# Distributed-optimizer state formats (Megatron-Core's `distrib_optim_sharding_type`; the config's
# `checkpoint.optimizer_format`). "fully_reshardable" gathers each model-parallel shard's buffers
# over the data-parallel group and stores them per parameter, in the model's own sharding, so a
# run resumes at any TP / PP / DP. "dp_reshardable" saves each rank's flat buffers without any
# gather (Megatron-LM's default) and resumes only at the same TP / PP. The model-space format
# Megatron documents as default needs flattened ShardedTensors, which 0.16.1 no longer supports.
# The non-distributed optimizer always stores per-parameter state (any layout).
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
# Checkpoints written before the format was recorded in trainer_state.json used this one.
UNRECORDED_OPTIMIZER_FORMAT = "dp_reshardable"


def _optimizer_sharded_state(state, model_state: dict, is_loading: bool, optimizer_format: str) -> dict:
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format must be one of {OPTIMIZER_FORMATS}, got {optimizer_format!r}")
    if is_loading:
        _materialize_optimizer_state(state.optimizer)
    return state.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                              metadata={"distrib_optim_sharding_type": optimizer_format})


def _materialize_optimizer_state(optimizer) -> None:
    """Give a never-stepped optimizer its (zero) state, so its sharded state dict has the
    structure the checkpoint is loaded into. Without apex / TE, Megatron reads the Adam `step`
    from every parameter's state, which torch only creates at the first step."""
    for part in _parts(optimizer):
        inner = part.optimizer
        if len(inner.state) == 0 and part.init_state_fn is not None:
            part.init_state_fn(inner, part.config)
            for param_state in inner.state.values():
                param_state.setdefault("step", torch.tensor(0.0))


def save_training_checkpoint(
    run_dir: str | Path,
    state,
    trainer_state: dict,
    config_yaml: str,
    hf_assets: str | Path | None = None,
    keep_last: int = 0,
    writer: CheckpointWriter | None = None,
    optimizer_format: str = "fully_reshardable",
) -> Path:
    """Collective: write `<run_dir>/iter_<step>` and then point `latest` at it.

    `state` is a `TrainState`; `trainer_state` is a JSON-able dict of the loop's own counters
    (it is extended with the scheduler state). `keep_last > 0` deletes older iterations.
    `writer` (default: synchronous) may write in the background: then the directory and the
    `latest` update appear at its `poll` / `wait`, once every rank's write is complete.
    `optimizer_format`: one of OPTIMIZER_FORMATS (recorded in trainer_state.json).
    """
    run_dir = Path(run_dir)
    directory = run_dir / iteration_name(state.step)
    model_state = _sharded_model_state(state.unwrapped_chunks())
    sharded = {"model": model_state,
               "optimizer": _optimizer_sharded_state(state, model_state, is_loading=False, optimizer_format=optimizer_format)}
    payload = dict(trainer_state, step=state.step, scheduler=state.scheduler.state_dict(),
                   world_size=dist.get_world_size() if dist.is_initialized() else 1,
                   optimizer_format=optimizer_format, layout=_model_parallel_layout())

    def rank0_files(staging: Path) -> None:
        _copy_assets(hf_assets)(staging)
        (staging / TRAINER_STATE).write_text(json.dumps(payload, indent=2) + "\n")
        (staging / CONFIG_FILE).write_text(config_yaml)
        (staging / RNG_DIR).mkdir()

    def every_rank_files(staging: Path) -> None:
        torch.save(rng_states(), staging / RNG_DIR / f"rank_{_rank():05d}.pt")

    def point_latest_here() -> None:
        _write_text_atomically(run_dir / LATEST, directory.name + "\n")
        if keep_last > 0:
            _prune(run_dir, keep_last)

    return _save_sharded(sharded, directory, rank0_files, every_rank_files, point_latest_here, writer)


def _model_parallel_layout() -> dict:
    """This run's model-parallel sizes (the layout a dp_reshardable optimizer state is tied to)."""
    from megatron.core import parallel_state as ps

    return {"tensor": ps.get_tensor_model_parallel_world_size(), "pipeline": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": ps.get_virtual_pipeline_model_parallel_world_size()}


def _check_optimizer_layout(directory: Path, payload: dict, state) -> str:
    """The optimizer format `directory` was saved in; refuses (one line) a dp_reshardable
    distributed-optimizer state at another tensor / pipeline layout, which cannot be mapped."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizer_format = payload.get("optimizer_format", UNRECORDED_OPTIMIZER_FORMAT)
    saved, current = payload.get("layout"), _model_parallel_layout()
    distributed = any(isinstance(part, DistributedOptimizer) for part in _parts(state.optimizer))
    if optimizer_format == "dp_reshardable" and distributed and saved is not None and saved != current:
        def shown(layout: dict) -> str:
            return f"TP{layout['tensor']} PP{layout['pipeline']}" + (
                f" VPP{layout['virtual_pipeline']}" if layout.get("virtual_pipeline") else "")

        raise ValueError(
            f"{directory}: its optimizer state was saved with checkpoint.optimizer_format=dp_reshardable at "
            f"{shown(saved)}, which resumes only at that tensor / pipeline layout (this run: {shown(current)}); "
            "resume at the saved layout, or save with checkpoint.optimizer_format=fully_reshardable to change it")
    return optimizer_format


def _prune(run_dir: Path, keep_last: int) -> None:
    iterations = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(ITERATION_PREFIX))
    for old in iterations[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint `latest` names, or None for a fresh run."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    directory = run_dir / pointer.read_text().strip()
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{pointer} names {directory.name}, which is not a complete checkpoint")
    return directory


def _parts(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _load_optimizer_state(optimizer, loaded: dict) -> None:
    """`optimizer.load_state_dict(loaded)`, with the per-parameter state of a fully_reshardable
    distributed optimizer loaded in a second step.

    Megatron-Core 0.16.1 without apex / TE gives every parameter's state torch Adam's `step`
    before it loads the fully_reshardable part, which stores none and then fails with KeyError
    'step'; so that part is loaded after the `step` entries are removed (`_restore_adam_steps`
    puts them back from the param groups).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = _parts(optimizer)
    states = [loaded] if len(parts) == 1 else [value for _, value in sorted(loaded.items())]
    with torch.no_grad():  # the optimizer copies into its main params, leaves that require grad
        for part, part_state in zip(parts, states):
            deferred = None
            if isinstance(part, DistributedOptimizer) and part_state.get("param_state_sharding_type") == "fully_reshardable":
                part_state = dict(part_state)
                deferred = part_state.pop("param_state")
            part.load_state_dict(part_state)
            if deferred is not None:
                for param_state in part.optimizer.state.values():
                    param_state.pop("step", None)
                part.load_parameter_state_from_fully_reshardable(deferred)
    if len(parts) > 1:
        optimizer._synchronize_steps()
    _restore_adam_steps(optimizer)


def _restore_adam_steps(optimizer) -> None:
    """Set every parameter's own Adam `step` from its param group after a load.

    Without apex / TE, megatron-core 0.16.1 keeps torch AdamW's per-parameter `step` only in the
    param groups of a checkpoint, and its load paths do not put it back into the per-parameter
    state (which the bias correction reads), so a resumed run restarted Adam's step count at 0
    and diverged from the uninterrupted run at the first update. Each parameter gets its own
    tensor: torch increments them in place.
    """
    for part in _parts(optimizer):
        inner = part.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                param_state = inner.state.get(param)
                if param_state is not None:
                    param_state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _load_strategy(directory: Path, fully_parallel: bool):
    """torch_dist's load strategy; `fully_parallel` (Megatron-LM's --ckpt-fully-parallel-load):
    each data-parallel rank reads a share of the replicated tensors and they exchange them,
    instead of every rank reading everything it needs."""
    if not fully_parallel:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(directory)),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def load_training_checkpoint(directory: str | Path, state, fully_parallel: bool = False) -> dict:
    """Collective: restore model, optimizer, scheduler and (same world size) RNG states.

    Returns the saved trainer state. At another world size the RNG states cannot map one to
    one; they are then left as the caller seeded them (the loop reseeds from (seed, step)).
    """
    from rift_megatron.trust.admission import load_megatron_checkpoint
    from rift_megatron.trust.unpickle import load_weights_only

    directory = Path(directory)
    payload = json.loads((directory / TRAINER_STATE).read_text())
    optimizer_format = _check_optimizer_layout(directory, payload, state)
    chunks = state.unwrapped_chunks()
    model_state = _sharded_model_state(chunks)
    sharded = {"model": model_state,
               "optimizer": _optimizer_sharded_state(state, model_state, is_loading=True, optimizer_format=optimizer_format)}
    loaded = load_megatron_checkpoint(sharded, directory, sharded_strategy=_load_strategy(directory, fully_parallel))
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model"][f"chunk{index}"])
    _load_optimizer_state(state.optimizer, loaded["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.step = payload["step"]
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = directory / RNG_DIR / f"rank_{_rank():05d}.pt"
    if payload.get("world_size") == world and rng_file.is_file():
        restore_rng_states(load_weights_only(rng_file, rng_file))
    return payload

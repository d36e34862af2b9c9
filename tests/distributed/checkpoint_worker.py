"""Worker for test_checkpoint_layouts.py: one torchrun world of 2 gloo processes, several layouts.

1. `reference`: TP2 loads the shared initial weights, trains step 1, saves a training checkpoint
   in the background (async writer, fully parallel save, fully_reshardable optimizer), trains
   steps 2 and 3 while it is written (the uninterrupted run), then waits for the write.
   The same at TP2 with the non-distributed optimizer, and a dp_reshardable save at TP2.
2. `resume_tp1dp2` and `resume_pp2`: a freshly seeded model (other weights) loads the TP2
   checkpoint and trains steps 2 and 3; at TP1 x DP2 the checkpoint is loaded with and without
   fully parallel load and every model and optimizer tensor compared, then saved again with and
   without fully parallel save; `resume_pp2_plain`: the non-distributed optimizer's checkpoint at PP2.
3. Controls that make the comparison able to fail: at PP2, the model weights alone with a fresh
   optimizer (step 3 must differ), and the dp_reshardable checkpoint at PP2 (must be refused).

Everything measured goes to `result.json` (rank 0) for the test to judge.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.loss import LossSettings
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_model_parallel
from rift_megatron.training.batch import shard_for_data_parallel
from rift_megatron.training.checkpoint import load_model_checkpoint, load_training_checkpoint, save_training_checkpoint
from rift_megatron.training.checkpoint_writer import CheckpointWriter
from rift_megatron.training.setup import OptimConfig, setup_training
from rift_megatron.training.step import train_step
from tests.distributed.parallel_worker import LR, architecture, start_worker, write_initial_weights
from tests.synthetic_batch import mixed_reward_batch

STEPS = 3
SAVED_AT = 1


def _state(spec: dict, work: Path, tp: int, pp: int, distributed: bool = True, initial: bool = False):
    layout = ParallelLayout(tensor=tp, pipeline=pp)
    init_model_parallel(layout, seed=4321)  # not the initial weights' seed: a resume must load them all
    return setup_training(architecture(spec), layout, OptimConfig(lr=LR, use_distributed_optimizer=distributed),
                          total_steps=STEPS, initial_weights=work / "init" if initial else None)


def _steps(state, count: int) -> list[float]:
    from megatron.core import parallel_state as ps

    shard = shard_for_data_parallel(mixed_reward_batch(seed=7), ps.get_data_parallel_rank(),
                                    ps.get_data_parallel_world_size())
    return [train_step(state, shard, LossSettings(), micro_batch_size=2)["loss"] for _ in range(count)]


def _save(state, directory: Path, writer: CheckpointWriter | None = None, optimizer_format: str = "fully_reshardable"):
    return save_training_checkpoint(directory, state, {"rollout_step": 0, "sampler": None}, "{}\n",
                                    writer=writer, optimizer_format=optimizer_format)


def reference(spec: dict, work: Path, result: dict) -> None:
    state = _state(spec, work, tp=2, pp=1, initial=True)
    writer = CheckpointWriter(asynchronous=True, fully_parallel=True)
    losses = _steps(state, SAVED_AT)
    _save(state, work / "tp2", writer)
    result["pending_after_save"] = writer.pending()
    for _ in range(SAVED_AT, STEPS):  # training goes on while the checkpoint is written
        losses += _steps(state, 1)
        writer.poll()
    writer.wait()
    result["pending_after_wait"] = writer.pending()
    result["reference"] = losses
    destroy_model_parallel()

    state = _state(spec, work, tp=2, pp=1, distributed=False, initial=True)
    result["reference_plain"] = _steps(state, SAVED_AT)
    _save(state, work / "tp2_plain")
    result["reference_plain"] += _steps(state, STEPS - SAVED_AT)
    destroy_model_parallel()

    state = _state(spec, work, tp=2, pp=1, initial=True)
    _steps(state, SAVED_AT)
    _save(state, work / "tp2_dp_reshardable", optimizer_format="dp_reshardable")
    destroy_model_parallel()


def _checkpoint(name: str, work: Path) -> Path:
    return work / name / f"iter_{SAVED_AT:07d}"


def _tensors(state) -> dict[str, torch.Tensor]:
    """This rank's model parameters, and the parameters its inner Adam steps with their state."""
    tensors = {f"model.{name}": param.detach().clone() for name, param in state.unwrapped_chunks()[0].named_parameters()}
    inner = state.optimizer.optimizer
    for g, group in enumerate(inner.param_groups):
        for i, param in enumerate(group["params"]):
            tensors[f"main.{g}.{i}"] = param.detach().clone()
            for key, value in inner.state.get(param, {}).items():
                if torch.is_tensor(value):
                    tensors[f"adam.{g}.{i}.{key}"] = value.detach().clone()
    return tensors


def resume_tp1dp2(spec: dict, work: Path, result: dict) -> None:
    state = _state(spec, work, tp=1, pp=1)
    load_training_checkpoint(_checkpoint("tp2", work), state, fully_parallel=False)
    serial = _tensors(state)
    destroy_model_parallel()
    state = _state(spec, work, tp=1, pp=1)
    load_training_checkpoint(_checkpoint("tp2", work), state, fully_parallel=True)
    parallel = _tensors(state)
    result.setdefault("fully_parallel_load_differences", {})[dist.get_rank()] = sorted(
        key for key in serial.keys() | parallel.keys()
        if key not in serial or key not in parallel or not torch.equal(serial[key], parallel[key]))
    result.setdefault("fully_parallel_load_compared", {})[dist.get_rank()] = len(serial)
    for name, fully_parallel in (("dp2_parallel_save", True), ("dp2_serial_save", False)):
        _save(state, work / name, CheckpointWriter(fully_parallel=fully_parallel))
    result["resume_tp1dp2"] = _steps(state, STEPS - SAVED_AT)
    destroy_model_parallel()


def resume_pp2(spec: dict, work: Path, result: dict) -> None:
    state = _state(spec, work, tp=1, pp=2)
    load_training_checkpoint(_checkpoint("tp2", work), state, fully_parallel=True)
    result["resume_pp2"] = _steps(state, STEPS - SAVED_AT)
    destroy_model_parallel()

    state = _state(spec, work, tp=1, pp=2, distributed=False)
    load_training_checkpoint(_checkpoint("tp2_plain", work), state)
    result["resume_pp2_plain"] = _steps(state, STEPS - SAVED_AT)
    destroy_model_parallel()

    state = _state(spec, work, tp=1, pp=2)  # control: the weights without the optimizer state
    load_model_checkpoint(state.unwrapped_chunks(), _checkpoint("tp2", work))  # fp32: main params are views
    result["weights_only_pp2"] = _steps(state, STEPS - SAVED_AT)
    destroy_model_parallel()

    state = _state(spec, work, tp=1, pp=2)
    try:
        load_training_checkpoint(_checkpoint("tp2_dp_reshardable", work), state)
        result["dp_reshardable_at_pp2"] = "loaded"
    except ValueError as error:
        result["dp_reshardable_at_pp2"] = str(error)
    destroy_model_parallel()


def main() -> None:
    spec, work = start_worker()
    write_initial_weights(spec, work)
    result: dict = {}
    for phase in (reference, resume_tp1dp2, resume_pp2):
        phase(spec, work, result)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        merged = dict(result)
        for key in ("fully_parallel_load_differences", "fully_parallel_load_compared"):
            merged[key] = {rank: part[key][rank] for part in gathered for rank in part.get(key, {})}
        (work / "result.json").write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Worker for the parallel-equivalence tests, launched by torchrun with 1, 2 or 4 processes.

It reads a JSON spec and, per run, initialises the requested TP/PP/VPP layout (DP fills the
world), loads the shared initial weights, trains a few RIFT steps on the same global batch, and
saves the final weights as a dist_checkpointing checkpoint plus the per-step metrics. A `compare`
spec loads every run's checkpoint into one TP1 model and reports per-tensor differences against
the baseline, so layouts are compared on the same unsharded weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from rift_megatron.loss import LossSettings
from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.batch import shard_for_data_parallel
from rift_megatron.training.checkpoint import load_model_checkpoint, save_model_checkpoint
from rift_megatron.training.setup import OptimConfig, build_model_chunks, setup_training
from rift_megatron.training.step import train_step
from rift_megatron.models.provider import GPTModelProvider
from tests.synthetic_batch import mixed_reward_batch

GLOBAL_BATCH = 8
LR = 1e-3


def architecture(spec: dict):
    return parse_hf_config(tiny_hf_config(**spec.get("model", {})))


def write_initial_weights(spec: dict, work: Path) -> None:
    init_model_parallel(ParallelLayout(), seed=1234)
    chunks = build_model_chunks(GPTModelProvider(architecture(spec), ParallelLayout()))
    save_model_checkpoint(chunks, work / "init")
    destroy_model_parallel()


def train_run(spec: dict, run: dict, work: Path) -> None:
    from megatron.core import parallel_state as ps

    layout = ParallelLayout(tensor=run["tp"], pipeline=run["pp"], virtual_pipeline=run.get("vpp"),
                            sequence_parallel=run.get("sp", False))
    init_model_parallel(layout, seed=1234)
    state = setup_training(
        architecture(spec),
        layout,
        OptimConfig(lr=LR, use_distributed_optimizer=run.get("distributed_optimizer", True)),
        total_steps=spec["steps"],
        initial_weights=work / "init",
    )
    settings = LossSettings(**run.get("loss", {}))
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    shard = shard_for_data_parallel(mixed_reward_batch(seed=7, seq_len=run.get("seq_len", 24)), dp_rank, dp_size)
    micro_batch_size = run.get("micro_batch_size", 2)
    # The first step's gradients, gathered to full TP1 tensors (DDP's main_grad, divided by the
    # global token count): where the distributed optimizer shards them over DP, no rank holds
    # them whole, so those runs are compared on losses, grad norms and weights only.
    capture = dp_size == 1 or not run.get("distributed_optimizer", True)
    grads: dict[str, torch.Tensor] = {}

    def first_gradients(metrics: dict) -> None:
        from rift_megatron.models.param_names import named_checkpoint_parameters
        from rift_megatron.rollout.weight_sync import gather_tensor_parallel

        for name, param in named_checkpoint_parameters(state.unwrapped_chunks()).items():
            grads[name] = gather_tensor_parallel(param, name, ps.get_tensor_model_parallel_group(), param.main_grad).clone()

    history = [train_step(state, shard, settings, micro_batch_size, check=first_gradients if step == 0 and capture else None)
               for step in range(spec["steps"])]
    if capture and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(grads, work / f"{run['name']}.grads.pp{ps.get_pipeline_model_parallel_rank()}.pt")
    save_model_checkpoint(state.unwrapped_chunks(), work / run["name"])
    if dist.get_rank() == 0:
        (work / f"{run['name']}.json").write_text(json.dumps({"dp": dp_size, "history": history}))
    destroy_model_parallel()


def compare_runs(spec: dict, work: Path) -> None:
    """Load each run's final weights at TP1 and diff them against the baseline's."""
    init_model_parallel(ParallelLayout(), seed=0)
    provider = GPTModelProvider(architecture(spec), ParallelLayout())

    def weights(name: str) -> dict[str, torch.Tensor]:
        chunks = build_model_chunks(provider)
        load_model_checkpoint(chunks, work / name)
        return {k: v for k, v in chunks[0].state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}

    baseline = weights(spec["baseline"])
    initial = weights("init")
    report = {}
    for name in spec["compare"]:
        other = weights(name)
        assert other.keys() == baseline.keys(), (name, sorted(other.keys() ^ baseline.keys()))
        report[name] = {
            key: float((other[key] - baseline[key]).abs().max()) for key in baseline
        }
    report["__moved_from_init__"] = {
        key: float((baseline[key] - initial[key]).abs().max()) for key in baseline
    }
    (work / "compare.json").write_text(json.dumps(report))
    destroy_model_parallel()


def start_worker() -> tuple[dict, Path]:
    """A torchrun worker's start: its `--spec` JSON and work directory, the process group up."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    init_distributed()
    return spec, Path(spec["work_dir"])


def main() -> None:
    spec, work = start_worker()
    if spec.get("write_init"):
        write_initial_weights(spec, work)
    for run in spec.get("runs", []):
        train_run(spec, run, work)
    if spec.get("compare"):
        compare_runs(spec, work)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

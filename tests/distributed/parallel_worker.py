"""Worker for the parallel-equivalence tests, launched by torchrun with 1, 2 or 4 processes.

It reads a JSON spec and, per run, initialises the requested TP/PP/VPP layout (DP fills the
world), loads the shared initial weights, trains a few RIFT steps on the same global batch, and
saves the final weights as a dist_checkpointing checkpoint plus the per-step metrics. A run with
`offload` moves every part of the trainer to host memory and back before, between and after its
steps (checking that each offloaded storage is empty meanwhile), as the online loop does around
generation. A `compare`
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
from rift_megatron.training.offload import OffloadParts, TrainerOffload
from rift_megatron.training.setup import OptimConfig, build_model_chunks, setup_training
from rift_megatron.training.step import micro_batches_of, prepare_batch, train_step
from rift_megatron.models.performance import OverlapRequest
from rift_megatron.models.provider import GPTModelProvider, PrecisionConfig
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
        PrecisionConfig(run.get("dtype", "fp32")),
        total_steps=spec["steps"],
        initial_weights=work / "init",
        overlap=OverlapRequest(**run.get("overlap", {})),
    )
    settings = LossSettings(**run.get("loss", {}))
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = mixed_reward_batch(seed=7, seq_len=run.get("seq_len", 24), shortest=run.get("shortest"))
    shard = shard_for_data_parallel(batch, dp_rank, dp_size)
    micro_batch_size, max_tokens = run.get("micro_batch_size", 2), run.get("max_tokens")
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

    offload = TrainerOffload(state, OffloadParts(params=True, grads=True, optimizer=True)) if run.get("offload") else None
    history = []
    for step in range(spec["steps"]):
        offload_and_reload(offload)
        history.append(train_step(state, shard, settings, micro_batch_size,
                                  check=first_gradients if step == 0 and capture else None,
                                  max_tokens_per_micro_batch=max_tokens))
    offload_and_reload(offload)
    # How many micro-batches (and of which shapes) each data-parallel rank ran: packing may differ.
    shapes = [list(mb["tokens"].shape) for mb in micro_batches_of(prepare_batch(shard, state), state, micro_batch_size, max_tokens)]
    per_rank = [None] * dp_size
    dist.all_gather_object(per_rank, shapes, group=ps.get_data_parallel_group())
    if capture and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(grads, work / f"{run['name']}.grads.pp{ps.get_pipeline_model_parallel_rank()}.pt")
    stale = _stale_weights(state)  # first: unwrapped_chunks() completes a deferred parameter gather
    # What each rank holds, for the memory model's tests: its parameter count (its TP shard of its
    # stage's chunks) and the bytes of its resident training state.
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, resident_state(state))
    save_model_checkpoint(state.unwrapped_chunks(), work / run["name"])
    if dist.get_rank() == 0:
        report = {"dp": dp_size, "history": history, "ranks": counts, "stale_before_sync": stale,
                  "micro_batches": per_rank, "overlap": [state.provider.options.overlap_grad_reduce, state.provider.options.overlap_param_gather]}
        (work / f"{run['name']}.json").write_text(json.dumps(report))
    destroy_model_parallel()


def resident_state(state) -> dict:
    """This rank's pipeline stage and parameter count, the bytes of each part of its training state
    after the steps (the storages TrainerOffload releases: parameter buffer, fp32 gradient buffer,
    optimizer state), and what bounds Megatron's padding of them: the number of parameter tensors
    (each starts at a multiple of 64 elements) and of buckets (each ends at a multiple of lcm(DP,
    128)), both only with the distributed optimizer."""
    from megatron.core import parallel_state as ps

    storages = TrainerOffload(state, OffloadParts()).storages()
    chunks = state.unwrapped_chunks()
    return {"stage": ps.get_pipeline_model_parallel_rank(),
            "parameters": sum(param.numel() for chunk in chunks for param in chunk.parameters()),
            "bytes": {part: sum(s.nbytes() for s in parts) for part, parts in storages.items()},
            "tensors": sum(1 for chunk in chunks for _ in chunk.parameters()),
            "buckets": sum(len(buffer.buckets) for chunk in state.model
                           for buffer in chunk.buffers + chunk.expert_parallel_buffers)}


def _stale_weights(state) -> float:
    """How far the module's weights are, before `unwrapped_chunks()` completes the parameter
    all-gather, from what it returns (0 without overlap_param_gather; this rank's view)."""
    from megatron.core.utils import unwrap_model

    before = [p.detach().clone() for chunk in unwrap_model(state.model) for p in chunk.parameters()]
    after = [p.detach() for chunk in state.unwrapped_chunks() for p in chunk.parameters()]
    return max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))


def offload_and_reload(offload: TrainerOffload | None) -> None:
    """Offload every part; each of this rank's storages (its shard of the optimizer state too)
    must hold 0 bytes until the reload."""
    if offload is None:
        return
    storages = [s for part in offload.storages().values() for s in part]
    offload.offload()
    assert storages and all(s.nbytes() == 0 for s in storages), [s.nbytes() for s in storages]
    offload.reload()


def compare_runs(spec: dict, work: Path) -> None:
    """Load each run's final weights at TP1 and diff them against its baseline's: for each
    baseline of spec["compare"] ({baseline: [runs]}), compare-<baseline>.json."""
    init_model_parallel(ParallelLayout(), seed=0)
    provider = GPTModelProvider(architecture(spec), ParallelLayout())

    def weights(name: str) -> dict[str, torch.Tensor]:
        chunks = build_model_chunks(provider)
        load_model_checkpoint(chunks, work / name)
        return {k: v for k, v in chunks[0].state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}

    initial = weights("init")
    for baseline_name, names in spec["compare"].items():
        baseline = weights(baseline_name)
        report = {}
        for name in names:
            other = weights(name)
            assert other.keys() == baseline.keys(), (name, sorted(other.keys() ^ baseline.keys()))
            report[name] = {
                key: float((other[key] - baseline[key]).abs().max()) for key in baseline
            }
        report["__moved_from_init__"] = {
            key: float((baseline[key] - initial[key]).abs().max()) for key in baseline
        }
        (work / f"compare-{baseline_name}.json").write_text(json.dumps(report))
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

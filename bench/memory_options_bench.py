"""What the trainer's memory options cost on the CPU: trainer offload and activation recomputation.

Issue 15 asks for a benchmark row per option, each against a baseline measured in the same run.
Two options trade time for memory and run on the CPU with the code the GPU runs:

    offload_vs_memcpy   seconds of one trainer offload + reload cycle (training/offload.py: params,
                        gradient buffers, optimizer state of a bf16 model under the distributed
                        optimizer, after one real step) / seconds of copying the same bytes out to
                        new host tensors and back with plain `copy_`: what the cycle costs beyond
                        moving its bytes (on the CPU both are host-to-host; the offload frees and
                        re-zeroes the gradient buffers instead of copying them, the memcpy copies all). Also reported: the
                        bytes released, which must equal the storages' bytes (a check, not a
                        timing). Target: report (on a GPU the copies cross PCIe: not measured).
    recompute_memory    bytes one training forward pass keeps for the backward pass with
                        `training.recompute` selective / full, over none (weights included).
    recompute_time      CPU seconds of one optimizer step (real `train_step`) with recompute over
                        none: the price of the memory above.

Seconds are the median of --reps interleaved repetitions, per second of this process's CPU time
(the machine may be shared; wall-clock seconds are printed too), one torch thread. The model is
bench/packing_bench.py's Llama-shaped one (hidden 256, 2 layers), 8 samples of 256 tokens.

    PYTHONPATH=. python bench/memory_options_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from loss_bench import megatron_world  # noqa: E402
from packing_bench import MODEL  # noqa: E402

SAMPLES, SEQ = 8, 256
RECOMPUTE = {"none": ("none", "uniform", 1), "selective": ("selective", "uniform", 1), "full": ("full", "uniform", 1)}


def training_batch(samples: int = SAMPLES, seq: int = SEQ, seed: int = 0) -> dict:
    """`samples` (even) rows of `seq` tokens, the second half of each a response, rewards of both
    signs (also bench/layout_bench.py's batch)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, MODEL["vocab_size"], (samples, seq), generator=g)
    mask = torch.zeros(samples, seq)
    mask[:, seq // 2:-1] = 1.0
    return {"tokens": tokens, "position_ids": torch.arange(seq).expand(samples, seq).clone(),
            "targets": torch.roll(tokens, -1, dims=1), "loss_mask": mask,
            "rewards": torch.tensor([1.0, -0.5] * (samples // 2)),
            "behavior_logprobs": torch.full((samples, seq), -6.9) * mask}


def _state(dtype: str, recompute: tuple[str, str, int] = RECOMPUTE["none"]):
    from rift_megatron.models import parse_hf_config
    from rift_megatron.models.presets import tiny_hf_config
    from rift_megatron.models.provider import PrecisionConfig, RecomputeConfig
    from rift_megatron.parallel import ParallelLayout
    from rift_megatron.training.setup import OptimConfig, setup_training

    granularity, method, layers = recompute
    return setup_training(parse_hf_config(tiny_hf_config(**MODEL)), ParallelLayout(), OptimConfig(lr=1e-5),
                          PrecisionConfig(dtype=dtype), total_steps=1000,
                          recompute=RecomputeConfig(granularity, method, layers))


def _timed(fn) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - cpu, time.perf_counter() - started


def measure_offload(reps: int) -> dict[str, Any]:
    """The offload_vs_memcpy row (see the module docstring)."""
    import torch

    from rift_megatron.loss import LossSettings
    from rift_megatron.training.offload import OffloadParts, TrainerOffload, bytes_view
    from rift_megatron.training.step import train_step

    state = _state("bf16")
    train_step(state, training_batch(), LossSettings(), micro_batch_size=4)  # Adam's state exists from here
    offload = TrainerOffload(state, OffloadParts(params=True, grads=True, optimizer=True))
    storages = [s for part in offload.storages().values() for s in part]
    total = sum(s.nbytes() for s in storages)

    def memcpy() -> None:
        hosts = [bytes_view(s, s.nbytes()).clone() for s in storages]
        for storage, host in zip(storages, hosts):
            bytes_view(storage, storage.nbytes()).copy_(host)

    released = []

    def cycle() -> None:
        offload.offload()
        released.append(offload.reload()["trainer_offloaded_gib"] * 2**30)

    seconds = {"offload": [], "memcpy": []}
    wall = {"offload": [], "memcpy": []}
    for _ in range(reps + 1):  # the first round is a warm-up
        for name, fn in (("offload", cycle), ("memcpy", memcpy)):
            cpu, elapsed = _timed(fn)
            seconds[name].append(cpu)
            wall[name].append(elapsed)
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    assert all(int(b) == total for b in released), (released, total)
    assert all(s.nbytes() > 0 for s in storages)  # reloaded
    return {"ratio": median["offload"] / median["memcpy"],
            "details": {"bytes": total, "released_bytes": int(released[-1]), "cpu_seconds": seconds,
                        "wall_seconds": wall, "dtype": "bf16", "distributed_optimizer": True,
                        "torch_threads": torch.get_num_threads()}}


def _kept_for_backward(state, batch: dict) -> int:
    """Bytes of the distinct storages one training forward pass saves for the backward pass."""
    import torch

    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model = state.model[0]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(batch["tokens"], batch["position_ids"], None)
    return sum(kept.values())


def measure_recompute(reps: int) -> dict[str, Any]:
    """The recompute_memory and recompute_time rows (see the module docstring)."""
    from rift_megatron.loss import LossSettings
    from rift_megatron.training.step import train_step

    batch = training_batch()
    states = {name: _state("fp32", recompute) for name, recompute in RECOMPUTE.items()}
    kept = {name: _kept_for_backward(state, batch) for name, state in states.items()}
    seconds: dict[str, list[float]] = {name: [] for name in states}
    wall: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(reps + 1):  # the first round is a warm-up
        for name, state in states.items():
            cpu, elapsed = _timed(lambda: train_step(state, batch, LossSettings(), micro_batch_size=4))
            seconds[name].append(cpu)
            wall[name].append(elapsed)
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    return {"memory": {name: kept[name] / kept["none"] for name in ("selective", "full")},
            "time": {name: median[name] / median["none"] for name in ("selective", "full")},
            "details": {"kept_bytes": kept, "cpu_seconds": seconds, "wall_seconds": wall,
                        "recompute": {name: list(value) for name, value in RECOMPUTE.items()}}}


def measure(quick: bool = False) -> dict[str, Any]:
    """Every row of this bench: offload_vs_memcpy, recompute_memory, recompute_time."""
    import torch

    torch.set_num_threads(1)
    reps = 2 if quick else 5
    with megatron_world(seed=0):
        offload = measure_offload(reps)
        recompute = measure_recompute(reps)
    return {"offload_vs_memcpy": offload, "recompute": recompute}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    result = measure(args.quick)
    offload, recompute = result["offload_vs_memcpy"], result["recompute"]
    d = offload["details"]
    print(f"offload_vs_memcpy  {offload['ratio']:.2f}  (offload + reload / memcpy out + in of the same "
          f"{d['bytes'] / 2**20:.1f} MiB; released {d['released_bytes']} bytes = every storage; target: report)")
    for name in ("selective", "full"):
        print(f"recompute {name:9s} memory {recompute['memory'][name]:.3f}  time {recompute['time'][name]:.3f}  "
              f"(bytes kept for backward / none: {recompute['details']['kept_bytes'][name]} / "
              f"{recompute['details']['kept_bytes']['none']}; CPU seconds of a step / none; target: report)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

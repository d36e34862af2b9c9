"""Training tokens/s vs parallel layout on the CPU (issue 16), as ratios to one process.

The same model, batch and settings train at world 1 and at TP2, PP2 and DP2 (2 gloo processes,
torchrun), one torchrun launch per layout, all in one invocation: after --warmup steps, --steps
real `train_step`s (Megatron schedule, RIFT loss, backward, distributed optimizer) on the same
global batch, timed between barriers on every rank. Printed per layout:

    tokens/s        global batch tokens x steps / the slowest rank's wall-clock seconds, and its
                    ratio to world 1's (2.0 would be a perfect split over 2 processes);
    CPU s / 1k tok  CPU seconds of all ranks together per 1000 tokens, and its ratio to world 1's:
                    what the layout costs beyond the math (communication, pipeline bubbles spent
                    waiting are not CPU time; gloo's busy waits are).

Each process runs torch on one thread, so a layout of 2 processes uses 2 cores to world 1's one.
The machine may be shared: wall-clock tokens/s then move with the load; the CPU ratio less so.
The model is bench/packing_bench.py's Llama shape (hidden 256, 4 heads of 64, 2 KV heads,
vocabulary 1024) with 4 layers, fp32; the batch bench/memory_options_bench.py's (8 samples of
256 tokens, --quick: 128), micro-batches of 2. CPU only: nothing here is a GPU number.

    PYTHONPATH=. python bench/layout_bench.py [--quick] [--steps N] [--json out.json]

`measure(tp, pp, ...)` is one rank's measurement (tests/unit/test_layout_bench.py runs it in
process at world 1 so the script cannot rot); `run(...)` returns the whole report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from memory_options_bench import training_batch  # noqa: E402
from packing_bench import MODEL  # noqa: E402
from push_bench import run_python  # noqa: E402

LAYERS = 4
MICRO_BATCH = 2
SAMPLES = 8
# name: (tensor, pipeline, processes); data parallel is what the processes leave.
LAYOUTS = {"world 1": (1, 1, 1), "TP2": (2, 1, 2), "PP2": (1, 2, 2), "DP2": (1, 1, 2)}
FULL = {"seq": 256, "steps": 4, "warmup": 1}
QUICK = {"seq": 128, "steps": 2, "warmup": 1}


def measure(tp: int, pp: int, seq: int, steps: int, warmup: int) -> dict:
    """One rank's part of a layout's run (the process group up, Megatron's not): wall-clock and
    CPU seconds of `steps` train_steps on the global batch, between barriers."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rift_megatron.loss import LossSettings
    from rift_megatron.models import parse_hf_config
    from rift_megatron.models.presets import tiny_hf_config
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_model_parallel
    from rift_megatron.training.batch import shard_for_data_parallel
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step

    layout = ParallelLayout(tensor=tp, pipeline=pp)
    init_model_parallel(layout, seed=0)
    try:
        arch = parse_hf_config(tiny_hf_config(**{**MODEL, "num_hidden_layers": LAYERS}))
        state = setup_training(arch, layout, OptimConfig(lr=1e-5), total_steps=warmup + steps)
        batch = training_batch(SAMPLES, seq)
        shard = shard_for_data_parallel(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        for _ in range(warmup):
            train_step(state, shard, LossSettings(), MICRO_BATCH)
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            train_step(state, shard, LossSettings(), MICRO_BATCH)
        dist.barrier()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                "tokens": SAMPLES * seq * steps}
    finally:
        destroy_model_parallel()


def worker(spec: dict) -> None:
    """One torchrun process (one torch thread): its measurement, gathered on rank 0 into spec["out"]."""
    import torch
    import torch.distributed as dist

    from rift_megatron.parallel import init_distributed

    torch.set_num_threads(1)
    init_distributed(cpu_only=True)
    result = measure(spec["tp"], spec["pp"], spec["seq"], spec["steps"], spec["warmup"])
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, result)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(ranks))
    dist.barrier()
    dist.destroy_process_group()


def run(quick: bool = False, steps: int | None = None, work_dir: Path | None = None) -> dict:
    """Every layout of LAYOUTS, one torchrun each, and their ratios to world 1."""
    settings = {**(QUICK if quick else FULL), **({"steps": steps} if steps else {})}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="rift-layout-bench-") as scratch:
        work = Path(work_dir or scratch)
        for index, (name, (tp, pp, processes)) in enumerate(LAYOUTS.items()):
            spec, out = work / f"layout-spec-{index}.json", work / f"layout-{index}.json"
            spec.write_text(json.dumps({"tp": tp, "pp": pp, "out": str(out), **settings}))
            run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", __file__,
                        "--worker", str(spec)], timeout=1800)
            ranks = json.loads(out.read_text())
            wall, cpu, tokens = max(r["wall_s"] for r in ranks), sum(r["cpu_s"] for r in ranks), ranks[0]["tokens"]
            rows[name] = {"tp": tp, "pp": pp, "dp": processes // (tp * pp), "processes": processes,
                          "tokens_per_s": tokens / wall, "cpu_s_per_1k_tokens": 1000 * cpu / tokens, "ranks": ranks}
    base = rows["world 1"]
    for row in rows.values():
        row["tokens_per_s_over_world1"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["cpu_per_token_over_world1"] = row["cpu_s_per_1k_tokens"] / base["cpu_s_per_1k_tokens"]
    return {"settings": {**settings, "samples": SAMPLES, "micro_batch": MICRO_BATCH, "layers": LAYERS,
                         "model": MODEL, "torch_threads_per_process": 1}, "layouts": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128-token samples, 2 timed steps (a smoke run)")
    parser.add_argument("--steps", type=int, help="timed steps per layout (default 4, --quick 2)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker.read_text()))
        return 0
    report = run(args.quick, args.steps)
    s = report["settings"]
    print(f"training tokens/s vs layout (CPU, gloo, 1 torch thread per process; {s['samples']} x {s['seq']} tokens "
          f"per step, micro-batches of {s['micro_batch']}, {s['steps']} timed steps after {s['warmup']}):")
    for name, row in report["layouts"].items():
        print(f"  {name:8s} {row['processes']} process(es): {row['tokens_per_s']:8.0f} tokens/s "
              f"(x{row['tokens_per_s_over_world1']:.2f} world 1), CPU {row['cpu_s_per_1k_tokens']:6.3f} s / 1k tokens "
              f"(x{row['cpu_per_token_over_world1']:.2f} world 1)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

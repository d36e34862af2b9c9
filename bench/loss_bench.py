"""Benchmark the RIFT training loss against Megatron's cross entropy on the bf16 chain (issue 15).

In bf16 training the last pipeline stage's output goes through `Float16Module`, whose forward
upcasts the bf16 logits with `float16_to_fp32`: a fresh fp32 `[batch, seq, vocab]` tensor that
only the loss reads. Megatron's `vocab_parallel_cross_entropy` works in that buffer (max, exp and
softmax in place, the softmax saved for backward and turned into the gradient in place). The
RIFT loss must not cost more. Targets, each a ratio against Megatron measured in the same run:

    loss_memory = peak allocated bytes of RIFT / of Megatron, forward + backward   <= 1.1
    loss_time   = fastest run's seconds of RIFT / of Megatron, forward + backward  <= 1.15

What one measurement runs (`_chain`), identically for every loss: a bf16 leaf tensor (the output
layer's result, `requires_grad`) -> `float16_to_fp32` (the function `Float16Module.forward`
applies) -> the loss -> `backward()` down to the bf16 leaf, whose `.grad` is reset before each
run. The losses:

* `megatron`: `megatron.core.tensor_parallel.vocab_parallel_cross_entropy(logits, targets)`,
  masked sum (the baseline);
* `rift`: the trainer's loss, `make_loss_func(..., consume_logits=True)` as `train_step` builds it
  (RIFT objective, mixed-sign rewards, behaviour log-probs, a masked prompt);
* `rift_copy` (informational): the same with `consume_logits=False`, i.e. what the trainer ran
  before issue 15: the log-probs in a second fp32 buffer next to the upcast logits.

Memory is the CPU allocator's own accounting: the run is repeated under `torch.profiler` with
`profile_memory=True`, and every allocation and free event (sizes, in time order) is summed into
a running total; the peak of that total above its start is the figure (`allocation_trace`). It
sees every tensor allocation, not pages, so it does not depend on the allocator returning memory
to the OS. Time is measured without the profiler: one warm-up each, then `--repeats` rounds in
which the losses take turns (drift on this shared machine hits all alike). The time ratio uses
each loss's fastest run: on a 2-core machine shared at load 30 a run's wall time is mostly the
neighbours' (the same loss took 1.4 to 5.8 s), and the fastest run is the one they disturbed
least. The ratios of median wall seconds and of median CPU seconds of this process are printed
as cross-checks.

Run (from the repository root):

    PYTHONPATH=. python bench/loss_bench.py               # 2 x 1024 tokens, vocabulary 128256
    PYTHONPATH=. python bench/loss_bench.py --quick       # 1 x 128 tokens: smoke test of the script
    PYTHONPATH=. python bench/loss_bench.py --json out.json

`measure(...)` returns the two ratios and the baseline's details; `suite_rows(quick)` gives the
suite's (`bench/run.py`) `loss_time` and `loss_memory` rows, with a profile split of one run of each
loss where a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from suite import describe_split, profile_split, row  # noqa: E402

MEMORY_TARGET = 1.1  # RIFT / Megatron peak allocated bytes, at most
TIME_TARGET = 1.15  # RIFT / Megatron median seconds, at most
FULL = dict(batch=2, seq=1024, vocab=128256, repeats=7)
QUICK = dict(batch=1, seq=128, vocab=128256, repeats=2)
LOSSES = ("megatron", "rift", "rift_copy")


@dataclass(frozen=True)
class AllocationTrace:
    """What the CPU allocator did during one call, in bytes, relative to its state before."""

    peak: int  # highest running total of allocations minus frees
    net: int  # total at the end
    allocations: tuple[int, ...]  # every allocation's size, in order

    def at_least(self, nbytes: int) -> int:
        """How many allocations were at least `nbytes` large."""
        return sum(1 for size in self.allocations if size >= nbytes)


def allocation_trace(fn: Callable[[], Any]) -> AllocationTrace:
    """Run `fn` under the profiler's memory accounting and replay its allocation events.

    Each allocator call made while profiling is one `[memory]` event with a signed byte count
    (negative: a free), also for tensors allocated before `fn` ran; summing them in time order
    gives the allocated bytes over time, relative to the start.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return AllocationTrace(peak=peak, net=total, allocations=tuple(e.nbytes() for e in events if e.nbytes() > 0))


@contextmanager
def megatron_world(seed: int | None = None) -> Iterator[Any]:
    """A one-process gloo world with Megatron's groups (its cross entropy reads the TP group);
    torn down afterwards unless the caller had one already. Yields the tensor-parallel group.
    `seed`: also seed Megatron's RNG tracker (needed to build and run a model)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel

    owned = not dist.is_initialized()
    if owned:
        init_distributed(cpu_only=True)
        init_model_parallel(ParallelLayout(), seed=seed)
    try:
        yield ps.get_tensor_model_parallel_group()
    finally:
        if owned:
            destroy_model_parallel()
            dist.destroy_process_group()


def make_case(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The bf16 model output (a leaf that requires grad) and a RIFT micro-batch for it."""
    g = torch.Generator().manual_seed(seed)
    output = (2.0 * torch.randn(batch, seq, vocab, generator=g)).to(torch.bfloat16).requires_grad_()
    mask = torch.ones(batch, seq)
    mask[:, : seq // 8] = 0  # a prompt
    micro = dict(
        targets=torch.randint(0, vocab, (batch, seq), generator=g),
        loss_mask=mask,
        rewards=torch.tensor([1.0 if i % 2 == 0 else -0.5 for i in range(batch)]),
        behavior_logprobs=-12.0 + torch.randn(batch, seq, generator=g),
    )
    return output, micro


def loss_functions(micro: dict[str, torch.Tensor], vocab: int, tp_group: Any) -> dict[str, Callable]:
    """logits -> scalar to call backward on, per loss in LOSSES."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rift_megatron.loss import LossSettings, make_loss_func

    def megatron(logits: torch.Tensor) -> torch.Tensor:
        return (vocab_parallel_cross_entropy(logits, micro["targets"]) * micro["loss_mask"]).sum()

    def rift(consume: bool) -> Callable:
        loss_func = make_loss_func(micro, LossSettings(), vocab_size=vocab, tp_group=tp_group, consume_logits=consume)
        return lambda logits: loss_func(logits)[0]

    return {"megatron": megatron, "rift": rift(True), "rift_copy": rift(False)}


def _chain(output: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """Float16Module's upcast, the loss, and backward to the bf16 model output (as in training).
    The previous run's gradient is dropped here, outside the call that is measured."""
    from megatron.core.transformer.module import float16_to_fp32

    output.grad = None
    return lambda: loss(float16_to_fp32(output)).backward()


def measure(batch: int, seq: int, vocab: int, repeats: int) -> dict[str, Any]:
    """Peak memory and time of each loss; `loss_memory` and `loss_time` are RIFT / Megatron."""
    from rift_megatron.platform.expected_warnings import silence_expected_warnings

    silence_expected_warnings()  # before Megatron's import-time "no Transformer Engine" lines
    output, micro = make_case(batch, seq, vocab)
    with megatron_world() as tp_group:
        losses = loss_functions(micro, vocab, tp_group)
        memory = {name: allocation_trace(_chain(output, fn)) for name, fn in losses.items()}
        for fn in losses.values():
            _chain(output, fn)()  # warm-up
        wall: dict[str, list[float]] = {name: [] for name in losses}
        cpu: dict[str, list[float]] = {name: [] for name in losses}
        for _ in range(repeats):
            for name, fn in losses.items():
                run = _chain(output, fn)
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
    logits_fp32_bytes = batch * seq * vocab * 4
    details = {
        name: {
            "peak_bytes": memory[name].peak,
            "peak_in_fp32_logits": memory[name].peak / logits_fp32_bytes,
            "fp32_logits_sized_allocations": memory[name].at_least(logits_fp32_bytes),
            "median_s": statistics.median(wall[name]),
            "best_s": min(wall[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "wall_s": wall[name],
        }
        for name in losses
    }
    base = details["megatron"]
    return {
        "loss_memory": details["rift"]["peak_bytes"] / base["peak_bytes"],
        "loss_time": details["rift"]["best_s"] / base["best_s"],
        "loss_median_time": details["rift"]["median_s"] / base["median_s"],
        "loss_cpu_time": details["rift"]["median_cpu_s"] / base["median_cpu_s"],
        "copy_memory": details["rift_copy"]["peak_bytes"] / base["peak_bytes"],
        "copy_time": details["rift_copy"]["best_s"] / base["best_s"],
        "targets": {"loss_memory": MEMORY_TARGET, "loss_time": TIME_TARGET},
        "shape": {"batch": batch, "seq": seq, "vocab": vocab, "fp32_logits_bytes": logits_fp32_bytes},
        "repeats": repeats,
        "losses": details,
        "torch_threads": torch.get_num_threads(),
    }


def suite_rows(quick: bool = False) -> dict[str, dict]:
    """The suite's `loss_time` and `loss_memory` rows (run.py holds the targets). A profile split
    of one run of each loss is measured only when this run's ratios miss the targets, as the cause."""
    size = QUICK if quick else FULL
    result = measure(**size)
    if result["loss_time"] > TIME_TARGET:
        result["profile"] = measure_profiles(size)
    base, rift = result["losses"]["megatron"], result["losses"]["rift"]
    time_cause = memory_cause = None
    if result["loss_time"] > TIME_TARGET:
        time_cause = (f"fastest runs {rift['best_s']:.3f} s vs {base['best_s']:.3f} s (median CPU-second ratio "
                      f"{result['loss_cpu_time']:.3f}); {describe_split('rift', result['profile']['rift'])}; "
                      f"{describe_split('megatron', result['profile']['megatron'])}")
    if result["loss_memory"] > MEMORY_TARGET:
        memory_cause = (f"peak {rift['peak_in_fp32_logits']:.2f} vs {base['peak_in_fp32_logits']:.2f} fp32 logits; "
                        f"logits-sized allocations {rift['fp32_logits_sized_allocations']} vs "
                        f"{base['fp32_logits_sized_allocations']}")
    shape = f"{size['batch']} x {size['seq']} tokens, vocabulary {size['vocab']}"
    note = f"--quick: {shape} (the full run: {FULL['batch']} x {FULL['seq']})" if quick else None
    return {"loss_time": row(result["loss_time"], result, time_cause, note),
            "loss_memory": row(result["loss_memory"], {"shape": result["shape"], "losses": {
                name: {k: v for k, v in d.items() if k != "wall_s"} for name, d in result["losses"].items()}},
                memory_cause, note)}


def measure_profiles(size: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """The profile split of one run of `rift` and of `megatron` on the same case as `measure`."""
    output, micro = make_case(size["batch"], size["seq"], size["vocab"])
    with megatron_world() as tp_group:
        losses = loss_functions(micro, size["vocab"], tp_group)
        return {name: profile_split(_chain(output, losses[name])) for name in ("rift", "megatron")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 x 128 tokens, 2 repeats: a smoke test of the script")
    for key in ("batch", "seq", "vocab", "repeats"):
        parser.add_argument(f"--{key}", type=int, help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    parser.add_argument("--json", help="write every number to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = {k: getattr(args, k) or (QUICK if args.quick else FULL)[k] for k in FULL}
    result = measure(**size)
    result.update(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                 "load_average": os.getloadavg()[0]},
    )
    print(f"shape {size['batch']} x {size['seq']} x vocab {size['vocab']}, bf16 output -> fp32 upcast -> loss "
          f"-> backward; {size['repeats']} repeats, {result['torch_threads']} torch threads")
    print(f"{'loss':<10} {'peak GiB':>9} {'x fp32 logits':>14} {'median s':>9} {'best s':>7} {'cpu s':>7}")
    for name, loss in result["losses"].items():
        print(f"{name:<10} {loss['peak_bytes'] / 2**30:>9.3f} {loss['peak_in_fp32_logits']:>14.3f} "
              f"{loss['median_s']:>9.3f} {loss['best_s']:>7.3f} {loss['median_cpu_s']:>7.3f}")
    for key, target in result["targets"].items():
        verdict = "PASS" if result[key] <= target else "FAIL"
        print(f"{key:<12} {result[key]:.3f} (target <= {target}) {verdict}")
    print(f"cross-checks: loss_median_time {result['loss_median_time']:.3f} (median wall s), loss_cpu_time "
          f"{result['loss_cpu_time']:.3f} (median CPU s); before issue 15 (rift_copy): memory "
          f"{result['copy_memory']:.3f}, time {result['copy_time']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

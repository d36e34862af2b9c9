"""Training tokens/s with micro-batches packed by length vs today's padding vs no padding at all.

Issue 15 section 3: each data-parallel rank's share used to be padded to its longest sample, so
with lengths spread over two orders of magnitude most of the training compute went to padding.
Target: packed tokens/s >= 0.8 x the ideal. Three ways to train on the SAME samples, one optimizer
step each (real `train_step`: Megatron schedule, RIFT loss, backward, Adam), measured in the same
process, interleaved, the median of --reps repetitions:

    padded  today's default: the share padded to its longest sample, micro-batches of
            --micro-batch-size samples (training.max_tokens_per_micro_batch null);
    packed  training.max_tokens_per_micro_batch = micro-batch-size x the longest possible sample
            (the same peak tokens per micro-batch as `padded`);
    ideal   every sample alone at its own length: no position computed is padding (it pays one
            micro-batch per sample, which true THD packing on a GPU would not).

Tokens/s counts the samples' own tokens (prompt + response) for all three, per second of this
process's CPU time: the machine is shared, and CPU time does not count the time other processes
hold the cores (wall-clock tokens/s are reported too). Torch runs on --threads threads, 1 by
default: with several, threads spin-waiting between small operations count as CPU time, which
penalises the many small micro-batches of `ideal` (seen: packed / ideal 1.30 per CPU-second but
0.78 wall-clock at 2 threads on a machine with load average 30-50). Lengths are drawn
log-uniformly between 20 and 2000 tokens (prompts 10..100 tokens, the rest response), rewards of
both signs. The model is a random-init Llama-shaped model (hidden 256, 2 layers, 4 heads of 64,
2 KV heads, vocabulary 1024) in fp32 at TP1, on the CPU.

    PYTHONPATH=. python bench/packing_bench.py            # 24 samples, 2 repetitions
    PYTHONPATH=. python bench/packing_bench.py --quick    # 12 samples, 1 repetition (a smoke run)

`suite_rows(quick)` returns the suite's (`bench/run.py`) `packing` row: packed / ideal tokens per
CPU-second; where it misses the target, the cause is the measured split (padding share of the
computed positions and the micro-batch counts of both modes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from suite import row  # noqa: E402

SHORTEST, LONGEST = 20, 2000
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 2048}
FULL = {"samples": 24, "reps": 2}
QUICK = {"samples": 12, "reps": 1}
TARGET = 0.8


def draw_samples(count: int, seed: int, vocab: int) -> list:
    """`count` samples of log-uniform total length in [SHORTEST, LONGEST], rewards +1 / -0.5."""
    from rift_megatron.rollout.batching import Sample

    rng = random.Random(seed)
    samples = []
    for index in range(count):
        length = int(round(SHORTEST * (LONGEST / SHORTEST) ** rng.random()))
        prompt = min(rng.randint(10, 100), length - 1)
        response = length - prompt
        samples.append(Sample(
            prompt_ids=[rng.randrange(3, vocab) for _ in range(prompt)],
            response_ids=[rng.randrange(3, vocab) for _ in range(response)],
            behavior_logprobs=[-math.log(vocab) + rng.gauss(0, 0.3) for _ in range(response)],
            reward=1.0 if index % 2 == 0 else -0.5,
        ))
    return samples


def measure(samples: int, reps: int, micro_batch_size: int = 4, seed: int = 0, threads: int = 1) -> dict:
    """Tokens/s of the three modes on one drawn batch (see the module docstring)."""
    import torch

    from rift_megatron.loss import LossSettings
    from rift_megatron.models import parse_hf_config
    from rift_megatron.models.presets import tiny_hf_config
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.rollout.batching import build_train_batch
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import micro_batches_of, prepare_batch, train_step

    drawn = draw_samples(samples, seed, MODEL["vocab_size"])
    batch = build_train_batch(drawn, pad_id=0)
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in drawn)
    budget = micro_batch_size * LONGEST
    modes = {"padded": None, "packed": budget, "ideal": 1}  # a 1-token budget: every sample alone
    torch.set_num_threads(threads)
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=seed)
    try:
        state = setup_training(parse_hf_config(tiny_hf_config(**MODEL)), ParallelLayout(),
                               OptimConfig(lr=1e-5, use_distributed_optimizer=False), total_steps=1000)
        settings = LossSettings()
        shapes = {mode: [list(mb["tokens"].shape) for mb in micro_batches_of(prepare_batch(batch, state), state,
                                                                              micro_batch_size, limit)]
                  for mode, limit in modes.items()}
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        wall: dict[str, list[float]] = {mode: [] for mode in modes}
        pad: dict[str, float] = {}
        for mode, limit in modes.items():  # warm-up, untimed
            pad[mode] = train_step(state, batch, settings, micro_batch_size, max_tokens_per_micro_batch=limit)["pad_fraction"]
        for _ in range(reps):
            for mode, limit in modes.items():
                started, cpu = time.perf_counter(), time.process_time()
                train_step(state, batch, settings, micro_batch_size, max_tokens_per_micro_batch=limit)
                seconds[mode].append(time.process_time() - cpu)
                wall[mode].append(time.perf_counter() - started)
    finally:
        destroy_model_parallel()
    rate = {mode: tokens / statistics.median(times) for mode, times in seconds.items()}
    wall_rate = {mode: tokens / statistics.median(times) for mode, times in wall.items()}
    return {
        "ratio": rate["packed"] / rate["ideal"],
        "details": {
            "packed_over_padded": rate["packed"] / rate["padded"],
            "tokens_per_cpu_s": rate, "cpu_seconds": seconds, "wall_tokens_per_s": wall_rate, "wall_seconds": wall,
            "wall_packed_over_ideal": wall_rate["packed"] / wall_rate["ideal"], "pad_fraction": pad,
            "micro_batches": {mode: len(s) for mode, s in shapes.items()}, "micro_batch_shapes": shapes,
            "samples": samples, "tokens": tokens, "budget": budget, "micro_batch_size": micro_batch_size,
            "reps": reps, "threads": threads, "model": MODEL, "load_average_1min": os.getloadavg()[0], "target": TARGET,
        },
    }


def suite_rows(quick: bool = False) -> dict[str, dict]:
    """The suite's `packing` row: packed / ideal tokens per CPU-second, at one torch thread."""
    result = measure(**(QUICK if quick else FULL))
    d = result["details"]
    cause = None
    if result["ratio"] < TARGET:
        cause = (f"packed computed {d['micro_batches']['packed']} micro-batches, {d['pad_fraction']['packed']:.1%} of "
                 f"their positions padding; ideal {d['micro_batches']['ideal']} micro-batches, none; "
                 f"{d['tokens_per_cpu_s']['packed']:.0f} vs {d['tokens_per_cpu_s']['ideal']:.0f} tokens/CPU-s")
    note = f"--quick: {d['samples']} samples, {d['reps']} repetition" if quick else None
    return {"packing": row(result["ratio"], d, cause, note)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 samples, 1 repetition: a smoke run")
    parser.add_argument("--samples", type=int, help=f"samples in the batch (default {FULL['samples']})")
    parser.add_argument("--reps", type=int, help=f"timed repetitions per mode (default {FULL['reps']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: v for k, v in (("samples", args.samples), ("reps", args.reps)) if v is not None})
    result = measure(seed=args.seed, threads=args.threads, **sizes)
    d = result["details"]
    print(f"{d['samples']} samples, {d['tokens']} tokens (log-uniform {SHORTEST}..{LONGEST}), "
          f"budget {d['budget']} tokens per micro-batch, {d['reps']} reps, {d['threads']} thread(s), "
          f"load average {d['load_average_1min']:.1f}")
    for mode in ("padded", "packed", "ideal"):
        print(f"  {mode:7s} {d['tokens_per_cpu_s'][mode]:8.1f} tokens/CPU-s {d['wall_tokens_per_s'][mode]:8.1f} tokens/s (wall)  "
              f"{d['micro_batches'][mode]:3d} micro-batches  "
              f"padding {d['pad_fraction'][mode]:.3f} of computed positions")
    verdict = "PASS" if result["ratio"] >= TARGET else "FAIL"
    print(f"packed / ideal = {result['ratio']:.3f} per CPU-second (target >= {TARGET}: {verdict}), "
          f"{d['wall_packed_over_ideal']:.3f} wall-clock; packed / padded = {d['packed_over_padded']:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How long a training checkpoint blocks the trainer: background (async) save vs synchronous save.

One process (gloo), a Llama of `--hidden` x `--layers` with the distributed optimizer after one
Adam step; each mode saves `--repeats` training checkpoints with `save_training_checkpoint`. For
the synchronous writer the trainer is blocked for the whole save; for the background writer only
until `save` returns (staging, planning, the fork) plus the finalize step at a later poll
(`.metadata`, the small files' checksums (each data file's digest comes from its writer), the
rename and `latest`); the write itself overlaps the next steps (a sleep of twice the synchronous save here).
Printed: median blocked seconds per mode and their ratio (same run, same machine), and the
finalize step's share.

    PYTHONPATH=. python bench/checkpoint_bench.py [--hidden 1024 --layers 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rift_megatron.loss import LossSettings
    from rift_megatron.models import parse_hf_config
    from rift_megatron.models.presets import tiny_hf_config
    from rift_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel
    from rift_megatron.training.checkpoint import save_training_checkpoint
    from rift_megatron.training.checkpoint_writer import CheckpointWriter
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step
    from tests.synthetic_batch import mixed_reward_batch

    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    arch = parse_hf_config(tiny_hf_config(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                          num_key_value_heads=args.hidden // 64))
    state = setup_training(arch, ParallelLayout(), OptimConfig(lr=1e-4))
    train_step(state, mixed_reward_batch(seed=0), LossSettings(), micro_batch_size=2)
    parameters = sum(p.numel() for p in state.unwrapped_chunks()[0].parameters())

    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    completed: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rift-ckpt-bench-") as work:
        for repeat in range(args.repeats):
            for mode in ("sync", "async"):
                writer = CheckpointWriter(asynchronous=mode == "async")
                started = time.perf_counter()
                save_training_checkpoint(Path(work) / f"{mode}{repeat}", state, {}, "{}\n", writer=writer)
                blocked[mode].append(time.perf_counter() - started)
                if mode == "async":
                    # stands in for the training steps the write overlaps; then the finalize step
                    # (.metadata, the small files' checksums, rename, `latest`) blocks a poll
                    time.sleep(2 * blocked["sync"][-1])
                    finalizing = time.perf_counter()
                    writer.wait()
                    blocked[mode][-1] += time.perf_counter() - finalizing
                    completed.append(time.perf_counter() - finalizing)
    sync, background = statistics.median(blocked["sync"]), statistics.median(blocked["async"])
    print(f"model: {parameters / 1e6:.0f}M parameters, fp32 + Adam ({parameters * 16 / 2**30:.2f} GiB checkpoint)")
    print(f"blocked per save: sync {sync:.2f} s, async {background:.2f} s (of which the finalize step "
          f"{statistics.median(completed):.2f} s); ratio async / sync = {background / sync:.3f}")


if __name__ == "__main__":
    main()

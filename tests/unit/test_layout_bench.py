"""bench/layout_bench.py cannot rot unnoticed: one rank's measurement (model, batch, data-parallel
shard, real train_steps between barriers) runs in this process at world 1 on short samples. No
timing is asserted; the torchrun launches of the other layouts are the bench's own."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import layout_bench  # noqa: E402


def test_layout_bench_measures_training_steps_at_world_1():
    from rift_megatron.parallel import init_distributed

    init_distributed(cpu_only=True)
    result = layout_bench.measure(1, 1, seq=32, steps=1, warmup=0)
    assert result["tokens"] == layout_bench.SAMPLES * 32
    assert result["wall_s"] > 0 and result["cpu_s"] > 0

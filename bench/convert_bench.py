"""Benchmark `rift convert` (HF <-> Megatron-Core) against raw disk reads of the same bytes.

The requirement (issue 3): conversion runs on the CPU and streams. One process's peak resident
memory must be bounded by a small multiple of the largest tensor or shard it handles, not by the
model size, and conversion should run at a good fraction of raw read speed. Targets, with
default settings, on a model of >= 1.5B parameters:

    throughput ratio  = conversion throughput / raw read throughput  >= 0.5
    peak RSS ratio    = peak RSS of the largest single process / model bytes  <= 0.25

What one run does (everything under --work-dir, deleted at the end unless --keep):

1. Writes a random-init HF checkpoint (config.json + safetensors shards) tensor by tensor with
   `rift_megatron.convert.safetensors_io`, so this script never holds the model either.
2. Measures a process that only imports the conversion modules (import-only RSS and time).
3. For each direction, first copies the input bytes (read + write + fsync: the suite's baseline,
   issue 17) and reads them raw (issue 3's baseline), same run, same page-cache state, then runs
   `python -m rift_megatron.cli convert ...` in a subprocess and measures its
   wall time and peak RSS (ru_maxrss via `/usr/bin/time -f %M`, plus every process's VmHWM polled
   from /proc, so multi-process runs are broken down per process).
4. Optionally checks the HF -> Megatron -> HF round trip is bit-exact, prints a table with
   PASS/FAIL per target and writes every number to --json.

Run (from the repository root):

    PYTHONPATH=. python bench/convert_bench.py                # Qwen2-1.5B-shaped, ~3.1 GB bf16
    PYTHONPATH=. python bench/convert_bench.py --quick        # ~100M params, smoke test only
    PYTHONPATH=. python bench/convert_bench.py --nproc 2 --json /tmp/convert_bench.json

`measure(...)` returns the report `--json` writes; `suite_rows(quick)` the suite's (`bench/run.py`)
`convert_vs_copy` and `convert_memory` rows.

Targets are only meaningful at >= 1.5B parameters: on a small model the fixed import overhead
of torch + Megatron dominates the RSS ratio and start-up time dominates the throughput ratio.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from rift_megatron.convert.mapping import expand  # noqa: E402
from rift_megatron.convert.safetensors_io import (  # noqa: E402
    HFCheckpointReader,
    StreamingSafetensorsWriter,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from rift_megatron.models import parse_hf_config  # noqa: E402
from suite import row  # noqa: E402

THROUGHPUT_TARGET = 0.5  # conversion throughput / raw read throughput, at least
RSS_TARGET = 0.25  # peak RSS of the largest single process / model bytes, at most
MIN_PARAMS_FOR_TARGETS = 1.5e9

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Qwen2-1.5B's shape (1.54B parameters, tied embeddings): the default.
QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
# Llama-3.2-1B's layer shape, untied and with 18 layers instead of 16 so it clears 1.5B (1.62B):
# exercises a separate lm_head and GQA with 8 KV heads.
LLAMA_1_6B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# --quick: Qwen2-style, ~100M parameters (smoke test of this script, not of the targets).
QUICK_OVERRIDES = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 2048,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}

READ_BLOCK = 64 * 2**20  # raw-read block size
POLL_SECONDS = 0.05  # /proc polling period for per-process memory


# --------------------------------------------------------------------------------------------
# Random-init checkpoint, written without holding the model
# --------------------------------------------------------------------------------------------


def model_config(name: str, quick: bool, dtype: str) -> dict:
    base = {"qwen2": QWEN2_1_5B, "llama": LLAMA_1_6B}[name]
    config = dict(base)
    if quick:
        config.update(QUICK_OVERRIDES)
        if name == "llama":
            config.update(num_attention_heads=12, num_key_value_heads=4, head_dim=64)
    config["torch_dtype"] = _CONFIG_DTYPE[dtype]
    return config


def write_random_checkpoint(hf_dir: Path, config: dict, dtype: torch.dtype, shard_bytes: int, seed: int) -> dict:
    """config.json + safetensors shards of random tensors, one tensor in memory at a time."""
    arch = parse_hf_config(config)
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    specs = [
        (name, tuple(shape), dtype)
        for mapping in expand(arch)
        for name, shape in zip(mapping.hf, mapping.hf_shapes(arch))
    ]
    shards = plan_shards(specs, shard_bytes)
    names = shard_file_names(len(shards))
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    largest = ("", 0)
    started = time.perf_counter()
    for file_name, shard in zip(names, shards):
        with StreamingSafetensorsWriter(hf_dir / file_name, shard) as writer:
            for name, shape, tensor_dtype in shard:
                tensor = torch.empty(shape, dtype=tensor_dtype)
                if name.endswith("norm.weight"):
                    tensor.fill_(1.0)  # RMSNorm weights start at one
                else:
                    tensor.normal_(0.0, 0.02, generator=generator)
                writer.write(name, tensor)
                weight_map[name] = file_name
                total += tensor.nbytes
                if tensor.nbytes > largest[1]:
                    largest = (name, tensor.nbytes)
                del tensor
    if len(names) > 1:
        write_index(hf_dir, weight_map, total)
    return {
        "architecture": arch.architecture,
        "num_parameters": arch.num_parameters(),
        "model_bytes": total,
        "num_tensors": len(specs),
        "num_shards": len(names),
        "shard_limit_bytes": shard_bytes,
        "largest_tensor": {"name": largest[0], "bytes": largest[1]},
        "files_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")),
        "generate_seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# Baseline: raw reads, page-cache control
# --------------------------------------------------------------------------------------------


def evict_from_page_cache(files: list[Path]) -> None:
    """Drop these files' clean pages from the page cache (only these files; no root needed)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> dict:
    """Read every byte of `files` with unbuffered readinto into one reused 64 MiB buffer."""
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while True:
                got = handle.readinto(view)
                if not got:
                    break
                total += got
    seconds = time.perf_counter() - started
    return {"bytes": total, "seconds": seconds, "bytes_per_second": total / seconds if seconds else float("inf")}


def raw_copy(files: list[Path], out_dir: Path, cache: str) -> dict:
    """The ceiling for any converter (the suite's `convert_vs_copy` baseline): read every byte,
    write it to a new file, fsync.

    Conversion must write as many bytes as it reads (and both commands fsync their output), so
    where the disk writes much slower than it reads this, not the raw read, bounds throughput.
    """
    if cache == "cold":
        evict_from_page_cache(files)
    else:
        raw_read(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as src, open(out_dir / path.name, "wb", buffering=0) as dst:
            while True:
                got = src.readinto(view)
                if not got:
                    break
                dst.write(view[:got])
                total += got
            os.fsync(dst.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"bytes": total, "seconds": seconds, "bytes_per_second": total / seconds, "cache": cache}


def baseline_read(files: list[Path], cache: str) -> dict:
    """The raw-read baseline in the requested page-cache state (see --cache)."""
    if cache == "cold":
        evict_from_page_cache(files)
    else:
        raw_read(files)  # untimed warm-up: the timed read then sees what the conversion will see
    result = raw_read(files)
    result["cache"] = cache
    result["files"] = len(files)
    return result


# --------------------------------------------------------------------------------------------
# Measured subprocesses
# --------------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "PPid"):
            fields[key] = int(value.split()[0])  # kB for Vm*, plain for PPid
    return fields


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def run_measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd`; wall time, exit code, peak RSS of the largest single process and a timeline.

    Peak RSS comes from two sources: ru_maxrss as GNU time reports it ("Maximum resident set
    size": the largest of the command and its reaped descendants, never a sum) and VmHWM of
    every process of the tree polled from /proc every 50 ms, which names the process and gives a
    sampled total across concurrent processes. The peak is the larger of the two.
    """
    per_process: dict[int, dict] = {}
    timeline: list[tuple[float, int]] = []
    done = threading.Event()
    # ru_maxrss of a child started straight from this process is useless: the kernel folds the
    # hiwater mark of the mm being replaced at exec (this benchmark's own, after it generated the
    # checkpoint) into the child's maxrss. GNU time forks from a 2 MB process, so its number is
    # the command's own.
    time_file = log.with_suffix(".maxrss")
    wrapper = ["/usr/bin/time", "-f", "%M", "-o", str(time_file)] if os.access("/usr/bin/time", os.X_OK) else []
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([*wrapper, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env)

        def poll() -> None:
            while not done.is_set():
                total = 0
                for pid in _descendants(proc.pid):
                    fields = _status(pid)
                    if not fields or "VmHWM" not in fields:
                        continue
                    info = per_process.setdefault(pid, {"pid": pid, "parent": fields.get("PPid"), "vm_hwm_kb": 0})
                    info["vm_hwm_kb"] = max(info["vm_hwm_kb"], fields["VmHWM"])
                    total += fields.get("VmRSS", 0)
                timeline.append((round(time.perf_counter() - started, 3), total))
                done.wait(POLL_SECONDS)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    hwm = max((p["vm_hwm_kb"] for p in per_process.values()), default=0)
    maxrss_kb = None
    if wrapper:
        lines = time_file.read_text().split() if time_file.is_file() else []
        maxrss_kb = int(lines[-1]) if lines and lines[-1].isdigit() else None
    peak_kb = max(maxrss_kb or 0, hwm)
    return {
        "cmd": cmd,
        "exit_code": proc.returncode,
        "seconds": seconds,
        "peak_rss_bytes": peak_kb * 1024,  # largest single process
        "ru_maxrss_source": "/usr/bin/time -f %M" if wrapper else None,
        "ru_maxrss_bytes": maxrss_kb * 1024 if maxrss_kb is not None else None,
        "polled_vm_hwm_bytes": hwm * 1024,
        "sampled_tree_rss_peak_bytes": max((t[1] for t in timeline), default=0) * 1024,
        "processes": sorted(
            ({"pid": p["pid"], "parent": p["parent"], "vm_hwm_bytes": p["vm_hwm_kb"] * 1024}
             for p in per_process.values()),
            key=lambda p: p["pid"],
        ),
        "user_seconds": usage.ru_utime,
        "system_seconds": usage.ru_stime,
        "timeline_kb": _downsample(timeline, 400),
        "log": str(log),
    }


def _downsample(points: list, keep: int) -> list:
    if len(points) <= keep:
        return points
    step = len(points) / keep
    return [points[int(i * step)] for i in range(keep)] + [points[-1]]


def check_ok(result: dict, what: str) -> None:
    if result["exit_code"] != 0:
        tail = Path(result["log"]).read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{what} failed with exit code {result['exit_code']}:\n{tail}")


# --------------------------------------------------------------------------------------------
# Round-trip check and report
# --------------------------------------------------------------------------------------------


def round_trip_equal(hf_dir: Path, hf2_dir: Path) -> dict:
    """Tensor by tensor: the exported HF checkpoint has the same names and bits as the source."""
    source, exported = HFCheckpointReader(hf_dir), HFCheckpointReader(hf2_dir)
    names, names2 = set(source.names()), set(exported.names())
    mismatched = [name for name in sorted(names & names2) if not torch.equal(source.read(name), exported.read(name))]
    return {
        "tensors": len(names),
        "missing_in_export": sorted(names - names2),
        "extra_in_export": sorted(names2 - names),
        "mismatched": mismatched,
        "exact": names == names2 and not mismatched,
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def summarize(label: str, conversion: dict, baseline: dict, model_bytes: int, imports: dict, copy: dict,
              alt_baseline: dict | None = None) -> dict:
    import_rss = imports["peak_rss_bytes"]
    throughput = model_bytes / conversion["seconds"]
    row = {
        "direction": label,
        "bytes": model_bytes,
        "seconds": conversion["seconds"],
        "throughput_bytes_per_second": throughput,
        "raw_read_bytes_per_second": baseline["bytes_per_second"],
        "throughput_ratio": throughput / baseline["bytes_per_second"],
        "peak_rss_bytes": conversion["peak_rss_bytes"],
        "peak_rss_ratio": conversion["peak_rss_bytes"] / model_bytes,
        "peak_rss_minus_import_bytes": conversion["peak_rss_bytes"] - import_rss,
        "import_rss_bytes": import_rss,
        "seconds_minus_import_seconds": conversion["seconds"] - imports["seconds"],
        # user + system CPU of the whole command tree: less sensitive to a busy machine than wall time
        "cpu_seconds": conversion["user_seconds"] + conversion["system_seconds"],
        "raw_copy_bytes_per_second": copy["bytes_per_second"],
        "throughput_ratio_vs_raw_copy": throughput / copy["bytes_per_second"],
    }
    if alt_baseline is not None:
        row["input_raw_read_bytes_per_second"] = alt_baseline["bytes_per_second"]
        row["throughput_ratio_vs_input_read"] = throughput / alt_baseline["bytes_per_second"]
    row["throughput_pass"] = row["throughput_ratio"] >= THROUGHPUT_TARGET
    row["rss_pass"] = row["peak_rss_ratio"] <= RSS_TARGET
    return row


def print_table(rows: list[dict], meaningful: bool) -> None:
    head = (f"{'direction':<22}{'bytes':>12}{'seconds':>9}{'cpu s':>7}{'conv GB/s':>10}{'read GB/s':>10}{'ratio':>7}"
            f"{'':>6}{'peak RSS':>11}{'RSS/model':>10}{'':>6}{'import RSS':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        verdict_t = "PASS" if r["throughput_pass"] else "FAIL"
        verdict_m = "PASS" if r["rss_pass"] else "FAIL"
        print(f"{r['direction']:<22}{r['bytes'] / 1e9:>10.3f}GB{r['seconds']:>9.1f}{r['cpu_seconds']:>7.1f}"
              f"{r['throughput_bytes_per_second'] / 1e9:>10.3f}{r['raw_read_bytes_per_second'] / 1e9:>10.3f}"
              f"{r['throughput_ratio']:>7.3f}{verdict_t:>6}{r['peak_rss_bytes'] / 1e9:>9.3f}GB"
              f"{r['peak_rss_ratio']:>10.3f}{verdict_m:>6}{r['import_rss_bytes'] / 1e9:>9.3f}GB")
    print(f"targets: throughput ratio >= {THROUGHPUT_TARGET} (conversion GB/s over raw read GB/s of the same "
          f"safetensors bytes), peak RSS / model bytes <= {RSS_TARGET} (largest single process)")
    if not meaningful:
        print(f"NOTE: model below {MIN_PARAMS_FOR_TARGETS / 1e9:.1f}B parameters: PASS/FAIL is not meaningful "
              "(fixed import/start-up costs dominate); use the default model for the real measurement")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("qwen2", "llama"), default="qwen2",
                        help="qwen2: Qwen2-1.5B shape, tied (default); llama: Llama-style 1.62B, untied")
    parser.add_argument("--quick", action="store_true", help="~100M-parameter model: smoke test, targets not meaningful")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="checkpoint dtype (default: bf16)")
    parser.add_argument("--shard-size", default="2GB", help="shard size of the generated HF checkpoint (default: 2GB)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="also run hf-to-mcore with --nproc N (default: only the default settings)")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="page-cache state of the inputs for both the raw read and the conversion: warm = "
                             "read once untimed first (default); cold = evict the input files with "
                             "posix_fadvise(DONTNEED) before the raw read and again before the conversion")
    parser.add_argument("--work-dir", help="where checkpoints go (default: a new temp dir under /tmp)")
    parser.add_argument("--out-dir",
                        help="where the conversions write their outputs (default: the work dir). E.g. a "
                             "directory on /dev/shm takes the disk's write bandwidth out of the measurement")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-verify", action="store_true", help="skip the bit-exact round-trip check")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    return parser.parse_args(argv)


def measure(config_name: str = "qwen2", quick: bool = False, dtype: str = "bf16", shard_size: str = "2GB",
            nproc: int = 0, cache: str = "warm", work_dir: str | Path | None = None, out_dir: str | Path | None = None,
            keep: bool = False, verify: bool = True, seed: int = 0, report: dict | None = None) -> dict:
    """Generate the checkpoint, measure both conversions (and `--nproc`) against their baselines,
    check the round trip; the report `--json` writes. `report`: a dict to fill as the run goes (so
    a caller still has what was measured when a step fails)."""
    python = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    made_work_dir = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="rift-convert-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    out_root = Path(out_dir) if out_dir else work
    made_out_dir = not out_root.exists()
    out_root.mkdir(parents=True, exist_ok=True)
    hf_dir, mc_dir, hf2_dir = work / "hf", out_root / "mcore", out_root / "hf_roundtrip"
    mc_np_dir = out_root / f"mcore_nproc{nproc}"
    for stale in (hf_dir, mc_dir, hf2_dir, mc_np_dir):
        if stale.exists():
            shutil.rmtree(stale)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    report = report if report is not None else {}
    report.update({
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(python).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {"config": config_name, "quick": quick, "dtype": dtype, "shard_size": shard_size, "nproc": nproc,
                     "cache": cache, "work_dir": str(work_dir), "out_dir": str(out_dir), "keep": keep,
                     "verify": verify, "seed": seed},
        # Wall times are only as good as the machine is quiet: recorded so noisy runs show.
        "load_average_start": os.getloadavg(),
        "targets": {"throughput_ratio_min": THROUGHPUT_TARGET, "peak_rss_ratio_max": RSS_TARGET},
        "work_dir": str(work),
        "out_dir": str(out_root),
    })
    try:
        config = model_config(config_name, quick, dtype)
        print(f"work dir {work}")
        print(f"writing random-init {config['architectures'][0]} checkpoint ({dtype}, shards <= {shard_size}) ...",
              flush=True)
        model = write_random_checkpoint(hf_dir, config, DTYPES[dtype], parse_size(shard_size), seed)
        report["model"] = model
        model_bytes = model["model_bytes"]
        print(f"  {model['num_parameters'] / 1e9:.3f}B parameters, {_gb(model_bytes)} in {model['num_shards']} "
              f"shard(s), largest tensor {model['largest_tensor']['name']} {_gb(model['largest_tensor']['bytes'])}, "
              f"written in {model['generate_seconds']:.1f}s", flush=True)
        hf_files = sorted(hf_dir.glob("*.safetensors"))

        print("import-only process ...", flush=True)
        imports = run_measured(
            [python, "-c", "import rift_megatron.convert.hf_to_mcore, rift_megatron.convert.mcore_to_hf"],
            env, logs / "import_only.log")
        check_ok(imports, "import-only process")
        report["import_only"] = imports
        print(f"  peak RSS {_gb(imports['peak_rss_bytes'])}, {imports['seconds']:.1f}s", flush=True)

        cli = [python, "-m", "rift_megatron.cli", "convert"]
        rows = []

        def convert(label: str, key: str, cmd: list[str], inputs: list[Path], log_name: str, **extra) -> dict:
            """The raw copy and the raw read right before the conversion (same page-cache state), then it."""
            copy = raw_copy(hf_files, out_root / "raw_copy", cache)
            print(f"  raw copy (read + write + fsync) of the safetensors: {_gb(copy['bytes'])} in "
                  f"{copy['seconds']:.2f}s = {copy['bytes_per_second'] / 1e9:.3f} GB/s", flush=True)
            base = baseline_read(hf_files, cache)
            print(f"  raw read of the safetensors ({cache} cache): {_gb(base['bytes'])} in "
                  f"{base['seconds']:.2f}s = {base['bytes_per_second'] / 1e9:.3f} GB/s", flush=True)
            if cache == "cold":
                evict_from_page_cache(inputs)
            elif inputs != hf_files:
                raw_read(inputs)  # the conversion's own inputs warm too
            print(f"  {label} ...", flush=True)
            result = run_measured(cmd, env, logs / log_name)
            check_ok(result, label)
            print(f"  {result['seconds']:.1f}s, peak RSS {_gb(result['peak_rss_bytes'])}", flush=True)
            report[key] = {"baseline": base, "raw_copy": copy, "conversion": result, **extra}
            rows.append(summarize(label, result, base, model_bytes, imports, copy, extra.get("input_raw_read")))
            return result

        print("hf-to-mcore (default settings)", flush=True)
        convert("hf-to-mcore", "hf_to_mcore", [*cli, "hf-to-mcore", "--hf", str(hf_dir), "--out", str(mc_dir)],
                hf_files, "hf_to_mcore.log")

        print("mcore-to-hf (default settings)", flush=True)
        mc_files = sorted(mc_dir.glob("*.distcp"))
        input_read = baseline_read(mc_files, cache)
        print(f"  raw read of the Megatron checkpoint's .distcp files ({cache} cache): "
              f"{_gb(input_read['bytes'])} in {input_read['seconds']:.2f}s = "
              f"{input_read['bytes_per_second'] / 1e9:.3f} GB/s", flush=True)
        convert("mcore-to-hf", "mcore_to_hf", [*cli, "mcore-to-hf", "--ckpt", str(mc_dir), "--out", str(hf2_dir)],
                mc_files, "mcore_to_hf.log", input_raw_read=input_read)

        if verify:
            started = time.perf_counter()
            check = round_trip_equal(hf_dir, hf2_dir)
            check["seconds"] = time.perf_counter() - started
            report["round_trip"] = check
            print(f"round trip HF -> Megatron -> HF: {'bit-exact' if check['exact'] else 'MISMATCH'} "
                  f"({check['tensors']} tensors)", flush=True)
            if not check["exact"]:
                print(f"  missing {check['missing_in_export'][:5]}, extra {check['extra_in_export'][:5]}, "
                      f"mismatched {check['mismatched'][:5]}")
        shutil.rmtree(hf2_dir, ignore_errors=True)

        if nproc > 1:
            shutil.rmtree(mc_dir, ignore_errors=True)  # free the disk before writing another copy
            print(f"hf-to-mcore --nproc {nproc}", flush=True)
            np_run = convert(
                f"hf-to-mcore --nproc {nproc}", f"hf_to_mcore_nproc{nproc}",
                [*cli, "hf-to-mcore", "--hf", str(hf_dir), "--out", str(mc_np_dir), "--nproc", str(nproc)],
                hf_files, f"hf_to_mcore_nproc{nproc}.log")
            for proc in np_run["processes"]:
                print(f"    pid {proc['pid']} (parent {proc['parent']}): VmHWM {_gb(proc['vm_hwm_bytes'])}")
            print(f"    sampled peak of the summed RSS of all its processes: "
                  f"{_gb(np_run['sampled_tree_rss_peak_bytes'])}")

        report["results"] = rows
        report["load_average_end"] = os.getloadavg()
        report["meaningful"] = model["num_parameters"] >= MIN_PARAMS_FOR_TARGETS
        report["all_pass"] = all(r["throughput_pass"] and r["rss_pass"] for r in rows)
    finally:
        if keep:
            print(f"kept {work}")
        else:
            for path in (mc_dir, hf2_dir, mc_np_dir):  # --out-dir may be on tmpfs: free it first
                shutil.rmtree(path, ignore_errors=True)
            if made_out_dir and out_root != work:
                shutil.rmtree(out_root, ignore_errors=True)
            if made_work_dir:
                shutil.rmtree(work, ignore_errors=True)
            else:
                shutil.rmtree(hf_dir, ignore_errors=True)
    return report


def suite_rows(quick: bool = False) -> dict[str, dict]:
    """The suite's `convert_vs_copy` (the slower direction's throughput / the raw copy measured
    right before it) and `convert_memory` (the larger direction's peak RSS / model bytes) rows,
    default model (Qwen2-1.5B shape, bf16), warm cache. The split behind each: per direction the
    wall seconds, CPU seconds, the import-only process's seconds / RSS (the floor every
    conversion pays) and the copy's seconds."""
    report = measure(quick=quick)
    if not report["round_trip"]["exact"]:
        raise RuntimeError("the HF -> Megatron -> HF round trip is not bit-exact: the conversions measured are wrong")
    rows = {r["direction"]: r for r in report["results"]}
    imports = report["import_only"]
    model = report["model"]
    note = (f"--quick: a {model['num_parameters'] / 1e9:.2f}B model; the targets are for >= 1.5B (fixed import and "
            "start-up costs dominate a small model)") if quick else None
    slow = min(rows.values(), key=lambda r: r["throughput_ratio_vs_raw_copy"])
    big = max(rows.values(), key=lambda r: r["peak_rss_ratio"])
    time_split = "; ".join(
        f"{r['direction']} {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} CPU s (importing alone: "
        f"{imports['seconds']:.1f} s wall) vs its copy {r['bytes'] / r['raw_copy_bytes_per_second']:.1f} s"
        for r in rows.values())
    memory_split = "; ".join(
        f"{r['direction']} {_gb(r['peak_rss_bytes'])} = import floor {_gb(r['import_rss_bytes'])} + "
        f"{_gb(r['peak_rss_minus_import_bytes'])}" for r in rows.values())
    details = {"model": {k: model[k] for k in ("architecture", "num_parameters", "model_bytes", "largest_tensor")},
               "directions": rows, "import_only": {"seconds": imports["seconds"], "peak_rss_bytes": imports["peak_rss_bytes"]},
               "round_trip_exact": report["round_trip"]["exact"]}
    return {
        "convert_vs_copy": row(slow["throughput_ratio_vs_raw_copy"], details, time_split, note),
        "convert_memory": row(big["peak_rss_ratio"], details, memory_split, note),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {}
    try:
        measure(args.config, args.quick, args.dtype, args.shard_size, args.nproc, args.cache, args.work_dir,
                args.out_dir, args.keep, not args.no_verify, args.seed, report)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    rows, model, imports = report["results"], report["model"], report["import_only"]
    print()
    print(f"{model['architecture']} {model['num_parameters'] / 1e9:.3f}B params, {args.dtype}, model "
          f"{_gb(model['model_bytes'])}, largest tensor {_gb(model['largest_tensor']['bytes'])}, cache {args.cache}, "
          f"raw read = readinto 64 MiB blocks of every shard file, outputs in {report['out_dir']}")
    print_table(rows, report["meaningful"])
    print(f"informational: mcore-to-hf vs a raw read of its own input (.distcp files): ratio "
          f"{rows[1]['throughput_ratio_vs_input_read']:.3f}; vs a raw copy (read + write + fsync) measured right "
          "before each: " + ", ".join(f"{r['direction']} {r['throughput_ratio_vs_raw_copy']:.3f} "
                                      f"({r['raw_copy_bytes_per_second'] / 1e9:.3f} GB/s)" for r in rows))
    print(f"import-only process: peak RSS {_gb(imports['peak_rss_bytes'])}, {imports['seconds']:.1f}s wall "
          "(included in every conversion's peak RSS and seconds)")
    print("load average (1 min) at start / end: "
          f"{report['load_average_start'][0]:.1f} / {report['load_average_end'][0]:.1f} on {os.cpu_count()} CPUs"
          " (wall-time ratios are unreliable when it exceeds the CPU count)")
    if not report.get("round_trip", {"exact": True})["exact"]:
        return 1  # a conversion that is not bit-exact measured the wrong thing
    if args.strict and report["meaningful"] and not report["all_pass"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

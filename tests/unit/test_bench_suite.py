"""The benchmark suite (`bench/run.py`, issue 17) keeps running: one small row end to end, and the
driver's handling of a part that cannot run.

Nothing here asserts on a timing or a ratio's value (they depend on the machine and its load):
only that the suite runs, writes the JSON schema the issue names and a results file, leaves the
committed bench/RESULTS.md alone, and turns a part that fails into failed rows with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests.environment import REPO_ROOT, subprocess_env

RUN = REPO_ROOT / "bench" / "run.py"


def _driver():
    spec = importlib.util.spec_from_file_location("bench_suite_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def test_quick_loss_time_row_runs_end_to_end_and_writes_the_schema(tmp_path):
    published = REPO_ROOT / "bench" / "RESULTS.md"
    before = published.read_bytes() if published.exists() else None
    out, results = tmp_path / "suite.json", tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(RUN), "--quick", "--only", "loss_time", "--json", str(out),
                           "--results", str(results)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    machine = report["machine"]
    for key in ("cpu", "cores", "memory_gib", "torch", "megatron_core", "vllm", "date", "commit", "load_start",
                "load_end"):
        assert key in machine, key
    assert [row["name"] for row in report["rows"]] == ["loss_time"]
    row = report["rows"][0]
    assert isinstance(row["ratio"], float) and row["ratio"] > 0, row.get("cause")
    assert isinstance(row["baseline"], str) and row["baseline"]
    assert row["target"] == "<= 1.15"
    assert isinstance(row["pass"], bool)
    assert row["pass"] == (row["ratio"] <= 1.15)
    text = results.read_text()
    assert "| `loss_time` |" in text and "## Machine" in text and machine["commit"] in text
    after = published.read_bytes() if published.exists() else None
    assert after == before, "a test run must not overwrite the published bench/RESULTS.md"


def test_a_part_that_cannot_start_fails_its_rows_with_the_reason(tmp_path, monkeypatch):
    run = _driver()
    monkeypatch.setitem(run.PARTS, "rollout", "no_such_bench_module")  # as if vLLM's bench could not import
    out = tmp_path / "rollout.json"
    assert run.run_part_here("rollout", True, out) == 1
    part = json.loads(out.read_text())
    assert "ModuleNotFoundError" in part["error"]
    part.update(others_cpus=0.0)
    rows = [run.assemble(spec, part) for spec in run.ROWS if spec.part == "rollout"]
    assert [r["name"] for r in rows] == ["rollout_vs_vllm", "rollout_vs_hf", "push_overhead", "push_vs_memcpy"]
    for r in rows:
        assert r["pass"] is False and r["ratio"] is None
        assert r["cause"].startswith("not measured: ModuleNotFoundError")
    markdown = run.results_markdown({"machine": run.machine_info(), "quick": True, "only": [], "seconds": 1.0,
                                     "load_start": 0.0, "load_end": 0.0, "rows": rows,
                                     "parts": {"rollout": {"seconds": 1.0, "load_start": 0.0, "load_end": 0.0,
                                                           "others_cpus": 0.0}}})
    assert markdown.count("FAIL (not measured)") == 4 and "no_such_bench_module" in markdown


def test_targets_and_missed_rows():
    run = _driver()
    specs = {spec.name: spec for spec in run.ROWS}
    assert set(specs) == {"loss_time", "loss_memory", "train_throughput", "train_mfu", "packing", "rollout_vs_vllm",
                          "rollout_vs_hf", "push_overhead", "push_vs_memcpy", "convert_vs_copy", "convert_memory"}
    assert specs["loss_time"].passes(1.15) and not specs["loss_time"].passes(1.16)
    assert specs["packing"].passes(0.8) and not specs["packing"].passes(0.79)
    assert specs["train_mfu"].passes(0.01) and specs["train_mfu"].target_text == "report"
    assert not specs["train_mfu"].passes(float("nan"))
    part = {"seconds": 1.0, "others_cpus": 0.0,
            "rows": {"packing": {"ratio": 0.5, "details": {}, "cause": "padding 40%", "note": None}}}
    missed = run.assemble(specs["packing"], part)
    assert missed["pass"] is False and missed["cause"] == "padding 40%" and missed["ratio"] == 0.5
    part["rows"]["packing"]["ratio"] = 0.9
    met = run.assemble(specs["packing"], part)
    assert met["pass"] is True and met["cause"] is None and met["details"]["split"] == "padding 40%"


def test_readme_quotes_the_published_results():
    run = _driver()
    readme = (REPO_ROOT / "README.md").read_text()
    quote = readme[readme.index(run.QUOTE_BEGIN) + len(run.QUOTE_BEGIN):readme.index(run.QUOTE_END)]
    quoted = [line for line in quote.splitlines() if line.startswith(("|", "Command:"))]
    published = (REPO_ROOT / "bench" / "RESULTS.md").read_text().splitlines()
    assert len(quoted) == 2 + 1 + len(run.ROWS), quoted  # header, rule, command, one line per row
    assert [line for line in published if line.startswith(("|", "Command:"))] == quoted

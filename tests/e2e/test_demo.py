"""End to end: `rift demo --quick` (the issue's CI requirement).

Runs the real pipeline in a subprocess (sentencepiece tokenizer, SFT warm-up, conversion both
ways, vLLM rollouts, rft / rift / naive online runs, held-out eval) and checks its outputs, and
that RIFT's held-out accuracy ends above the warm-up model's; then `rift eval` on the exported
RIFT model, checked prompt by prompt against an independent scorer (`transformers` greedy decoding
and a regular expression on the `\\boxed{}` answer); then examples/tiny_cpu/config.yaml, whose
paths name the demo's outputs, trains from them. Takes about 3-4 minutes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.environment import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo_out"  # the directory name the example config expects
    _rift("demo", "--quick", "--out", str(out))
    return out


def _rift(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rift_megatron.cli", *args], cwd=cwd, env=subprocess_env(),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"rift {args[0]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_outputs_exist(demo_out: Path) -> None:
    for name in ("results.json", "results.md", "data/train.jsonl", "data/heldout.jsonl"):
        assert (demo_out / name).is_file(), name
    model = demo_out / "rift_model"
    assert (model / "config.json").is_file()
    assert (model / "tokenizer.model").is_file(), "the sentencepiece tokenizer must be copied through"
    assert any(model.glob("*.safetensors"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert (demo_out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_disjoint_from_train(demo_out: Path) -> None:
    prompts = lambda name: {json.loads(line)["prompt"] for line in (demo_out / "data" / name).read_text().splitlines()}
    assert not prompts("train.jsonl") & prompts("heldout.jsonl")


def test_results_shape(demo_out: Path) -> None:
    results = json.loads((demo_out / "results.json").read_text())
    assert isinstance(results["baseline_accuracy"], float)
    assert set(results["algorithms"]) == {"rift", "rft", "naive"}
    for name, entry in results["algorithms"].items():
        assert isinstance(entry["heldout_accuracy"], float), name
        assert isinstance(entry["final_loss"], float), name
        assert 0.0 <= entry["heldout_accuracy"] <= 1.0
        assert len(entry["heldout_accuracy_per_seed"]) >= 1
    assert set(results["claims"]) == {"1_stability", "2_rift_vs_rft"}
    # a consistency check of the report: bounded by construction (property 1 is tested in test_loss.py)
    assert results["algorithms"]["rift"]["min_loss"] >= 0.0


# The gain must be this many standard errors of the held-out estimate (binomial, 1000 problems,
# baseline and run combined). Measured (2026-12-06, one 2-core machine): --quick (seed 0) 0.673 ->
# 0.812 = 7.2 standard errors, identical at 1, 2 and 3 torch threads; the default run's three seeds
# gained 7.2, 6.2 and 2.9 standard errors (0.812, 0.794, 0.733). 2 standard errors (a gain of
# ~0.04 here) sits below the smallest seed's and is still significant on its own (one-sided p ~ 0.02).
# The previous --quick (8 iterations, 200 problems) gained 0.000 on this machine and +0.18 on
# another: one seed over few iterations could not show a gain reliably.
MIN_GAIN_STANDARD_ERRORS = 2.0


def test_rift_improves_on_warmup_by_several_standard_errors(demo_out: Path) -> None:
    results = json.loads((demo_out / "results.json").read_text())
    rift, baseline, problems = results["algorithms"]["rift"], results["baseline_accuracy"], results["settings"]["n_heldout"]
    assert results["baseline_standard_error"] == pytest.approx((baseline * (1 - baseline) / problems) ** 0.5)
    assert rift["gain_over_baseline"] == pytest.approx(rift["heldout_accuracy"] - baseline)
    assert rift["gain_in_standard_errors"] >= MIN_GAIN_STANDARD_ERRORS, rift


def write_jsonl_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _reference_greedy_verdicts(model_dir: Path, records: list[dict], max_tokens: int) -> list[bool]:
    """Independent of vLLM and of math-verify: `transformers` greedy decoding, then the integer in
    the last `\\boxed{...}` compared with the gold answer."""
    import re

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rift_megatron.data.prompts import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    verdicts = []
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([render_prompt(tokenizer, record["prompt"], chat_template=False)])
            output = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id or 0)
            text = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
            boxed = re.findall(r"\\boxed\{\s*(-?\d+)\s*\}", text)
            verdicts.append(bool(boxed) and int(boxed[-1]) == int(record["answer"]))
    return verdicts


def test_rift_eval_scores_the_exported_model_like_an_independent_scorer(demo_out: Path) -> None:
    """`rift eval` (math reward) on the exported RIFT model and on the held-out file: its greedy
    per-prompt verdicts equal the reference's, and with -k it adds pass@k / majority@k."""
    # `rift eval` on the first 200 held-out problems (transformers' greedy reference decodes one
    # prompt at a time; 200 verdicts are plenty to compare scorers)
    records = [json.loads(line) for line in (demo_out / "data" / "heldout.jsonl").read_text().splitlines()][:200]
    heldout = write_jsonl_records(demo_out / "heldout_first200.jsonl", records)
    max_tokens = json.loads((demo_out / "results.json").read_text())["settings"]["max_tokens"]
    result_path = demo_out / "rift_model_eval.json"
    _rift("eval", "--model", str(demo_out / "rift_model"), "--prompts", str(heldout), "-k", "4",
          "--max-tokens", str(max_tokens), "--dtype", "float32", "--out", str(result_path))
    result = json.loads(result_path.read_text())
    reference = _reference_greedy_verdicts(demo_out / "rift_model", records, max_tokens)
    # fp32 vLLM vs fp32 transformers greedy decoding: an exact tie-break difference is possible in
    # principle, never seen here (0 of 200 differ); allow one prompt in a hundred.
    differing = [i for i, (a, b) in enumerate(zip(result["per_prompt_greedy_correct"], reference)) if a != b]
    assert len(result["per_prompt_greedy_correct"]) == len(records) and len(differing) <= len(records) // 100, differing
    assert result["pass@1_greedy"] == pytest.approx(sum(result["per_prompt_greedy_correct"]) / len(records))
    assert 0 < sum(reference) < len(records), "the reference must see both right and wrong answers"
    assert 0.0 <= result["majority@4"] <= 1.0 and result["pass@4"] >= result["sample_accuracy"]
    assert result["k"] == 4 and result["prompts"] == len(records)


def test_the_tiny_cpu_example_trains_from_the_demo_outputs(demo_out: Path) -> None:
    """`rift train --config examples/tiny_cpu/config.yaml` launched next to demo_out/ (two steps)."""
    config = ROOT / "examples" / "tiny_cpu" / "config.yaml"
    _rift("train", "--config", str(config), "training.steps=2", "eval.interval=0", cwd=demo_out.parent)
    run = demo_out.parent / "runs" / "tiny_cpu"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in steps if "loss" in m]
    assert [m["step"] for m in trained] == [1, 2] and all(m["tokens"] > 0 for m in trained)
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"

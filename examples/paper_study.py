"""The study that can decide the paper's claims at toy scale: rift vs rft vs naive, paired over seeds.

    .venv/bin/python examples/paper_study.py [--out study_out] [--seeds 10] [--smollm2-seeds 5]
        [--parts toy_offline,toy_online,smollm2] [--warmups scarce,plentiful] [--report-only]

Not part of CI (about 1.5-2 hours on 2 cores). Every training, rollout and evaluation is a `rift`
subprocess, as a user runs them (`rift train`, `rift rollout`, `rift eval`); finished runs are kept
(`<run>/study_result.json`), so an interrupted study continues where it stopped, and
`--report-only` rebuilds the results from whatever has finished.

Settings (each with the same seeds 0..N-1 for every algorithm; one seed = one pairing):

* **toy, offline** (the paper's own setting): the demo's task and model. Per seed, one scored buffer
  (`rift rollout -k 8` on 384 training prompts drawn by the seed, from the warm-up model, rewards
  r_pos 1 / r_neg -1), then rft, rift and naive each trained on that same buffer for the same 48
  optimizer steps (2 epochs of 128 samples), in the same order (the trainer draws the buffer with
  `training.seed`); held-out greedy accuracy (1000 problems) at the start and the end.
* **toy, online** (the demo's setting): `rift demo`'s online runs (24 iterations x 32 prompts x 8
  samples, 48 steps) with seeds 0..N-1.
* both from two warm-ups: **scarce** positives (SFT until validation accuracy >= 0.15) and
  **plentiful** (>= 0.5); negatives should matter most when positives are rare.
* **SmolLM2-135M-Instruct** (a real pretrained model, the real-model tier's folder), offline: its
  chat template, 2-number additions with the answer in ``\\boxed{}``, math reward. Per seed: 32
  training prompts drawn by the seed, `rift rollout -k 4 --max-tokens 64` (fp32), then rft, rift and
  naive trained on that buffer (4 steps of 32 samples, lr 2e-5), each evaluated with `rift eval
  --ckpt` (greedy, 100 held-out problems, 64 tokens); the untrained model's accuracy from
  `rift eval --model`.

Statistics (rift_megatron/demo/paired.py): per pairing, the difference of final held-out accuracies;
their mean with a Student-t 95% interval, and the exact sign test. A difference is *shown* when the
interval excludes 0.

Outputs: `<out>/results.json` (every run's numbers), `<out>/results.md`, `<out>/paired.png`; the
copy checked into the repository is examples/paper_study_results.md (+ .json, .png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from rift_megatron.demo.paired import paired_comparison
from rift_megatron.demo.pipeline import (
    DemoSettings, _log, _parallel, _rift, _run, _write_yaml, offline_run, online_run, prepare,
)
from rift_megatron.demo.report import ALGORITHMS

WARMUPS = {"scarce": 0.15, "plentiful": 0.5}  # SFT stops at the first validation check >= these
TOY_OFFLINE_PROMPTS = 384          # x k 8 = 3072 samples: 24 steps of 128 per epoch
TOY_OFFLINE_EPOCHS = 2             # 48 steps: as many as the online runs
# SmolLM2: sized so 5 seeds x 3 algorithms fit in about an hour on 2 cores.
SMOL_TRAIN_PROMPTS, SMOL_K, SMOL_MAX_TOKENS, SMOL_HELDOUT = 32, 4, 64, 100
SMOL_STEPS, SMOL_BATCH, SMOL_LR = 4, 32, 2.0e-5
SMOL_TEMPLATE = "What is {a} + {b}? Put the final answer in \\boxed{{}}."
COMPARISONS = (("rift", "rft"), ("rift", "naive"), ("rft", "naive"))


# ----------------------------------------------------------------------------- caching


def cached(run_dir: Path, job) -> dict:
    """`job()`'s result, stored as `run_dir/study_result.json`: a finished run is never redone."""
    marker = run_dir / "study_result.json"
    if marker.exists():
        return json.loads(marker.read_text())
    result = job()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(result, indent=1) + "\n")
    return result


def finished(run_dir: Path) -> dict | None:
    marker = run_dir / "study_result.json"
    return json.loads(marker.read_text()) if marker.exists() else None


# ----------------------------------------------------------------------------- toy settings


def toy_settings(target: float, seeds: int) -> DemoSettings:
    # The SFT transition is sharp (validation 0.165 -> 0.365 within 25 steps): check every 5 steps so
    # the warm-up stops near its target, not past it.
    return replace(DemoSettings(), warmup_target=target, sft_eval_interval=5, seeds=tuple(range(seeds)))


def write_subset(path: Path, records: list[dict], count: int, seed: int) -> Path:
    """`count` records drawn by `seed` (without replacement) as a prompt file."""
    chosen = random.Random(seed).sample(records, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return path


def rollout_buffer(model: Path, prompts: Path, out: Path, seed: int, k: int, max_tokens: int, reward: str,
                   extra: tuple[str, ...] = ()) -> Path:
    """`rift rollout` from `model`: one scored buffer (r_pos 1, r_neg -1)."""
    _run(_rift("rollout", "--model", str(model), "--prompts", str(prompts), "-k", str(k), "--out", str(out),
               "--max-tokens", str(max_tokens), "--reward", reward, "--r-pos", "1", "--r-neg", "-1",
               "--dtype", "float32", "--seed", str(seed), "--overwrite", *extra), out.parent / f"{out.name}.log")
    return out


def buffer_accuracy(buffer: Path) -> float:
    return json.loads((buffer / "manifest.json").read_text())["counts"]["accuracy"]


def toy_offline(out: Path, s: DemoSettings, prepared, jobs: int) -> list[dict]:
    """Per seed: its buffer, then rft / rift / naive on it; `jobs` seeds at a time."""
    train_records = [json.loads(line) for line in prepared.train.read_text().splitlines() if line.strip()]
    steps = TOY_OFFLINE_PROMPTS * s.k // s.global_batch_size * TOY_OFFLINE_EPOCHS

    def one_seed(seed: int) -> list[dict]:
        def buffer() -> dict:
            prompts = write_subset(out / "offline" / f"prompts_seed{seed}.jsonl", train_records, TOY_OFFLINE_PROMPTS, seed)
            path = rollout_buffer(prepared.warmup, prompts, out / "offline" / f"buffer_seed{seed}", seed, s.k,
                                  s.max_tokens, s.reward)
            return {"buffer": str(path), "accuracy": buffer_accuracy(path)}

        made = cached(out / "offline" / f"buffer_seed{seed}_done", buffer)
        runs = [cached(out / "runs" / f"offline_{a}_seed{seed}", lambda a=a: {
            **offline_run(out, s, a, seed, prepared, Path(made["buffer"]), steps, prepared.heldout,
                          f"offline_{a}_seed{seed}"), "buffer_accuracy": made["accuracy"]}) for a in ALGORITHMS]
        _log(f"toy offline seed {seed} (buffer accuracy {made['accuracy']:.3f}): "
             + ", ".join(f"{r['algorithm']} {r['final_accuracy']:.3f}" for r in runs))
        return runs

    return [run for runs in _parallel([lambda seed=seed: one_seed(seed) for seed in s.seeds], jobs) for run in runs]


def toy_online(out: Path, s: DemoSettings, prepared, jobs: int) -> list[dict]:
    work = [lambda a=a, seed=seed: cached(out / "runs" / f"online_{a}_seed{seed}", lambda: online_run(
        out, s, a, seed, prepared, prepared.heldout, False, f"online_{a}_seed{seed}"))
        for seed in s.seeds for a in ALGORITHMS]
    return _parallel(work, jobs)


# ----------------------------------------------------------------------------- SmolLM2


def smollm2_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.real_model.smollm2 import ensure_smollm2, missing_requirements

    reason = missing_requirements()
    if reason is not None:
        raise SystemExit(f"paper_study: SmolLM2 part: {reason} (or pass --smollm2 DIR)")
    return ensure_smollm2()


def addition_records(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"prompt": SMOL_TEMPLATE.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs]


def smol_eval(out_json: Path, source: list[str], heldout: Path) -> float:
    def job() -> dict:
        _run(_rift("eval", *source, "--prompts", str(heldout), "--chat-template", "--reward", "math",
                   "--max-tokens", str(SMOL_MAX_TOKENS), "--dtype", "float32", "--out", str(out_json)),
             out_json.with_suffix(".log"))
        return json.loads(out_json.read_text())

    return cached(out_json.parent / f"{out_json.stem}_done", job)["pass@1_greedy"]


def smollm2(out: Path, model: Path, seeds: list[int]) -> tuple[float, list[dict]]:
    """Offline rft / rift / naive on SmolLM2 from one buffer per seed; returns (baseline, runs)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(1234).shuffle(pairs)
    heldout = out / "data" / "heldout.jsonl"
    heldout.parent.mkdir(parents=True, exist_ok=True)
    heldout.write_text("".join(json.dumps(r) + "\n" for r in addition_records(pairs[:SMOL_HELDOUT])))
    train_records = addition_records(pairs[SMOL_HELDOUT:])
    baseline = smol_eval(out / "evals" / "base.json", ["--model", str(model)], heldout)
    mcore = out / "base_mcore"  # converted once, not by every run
    if not (mcore / "metadata.json").is_file():
        _run(_rift("convert", "hf-to-mcore", "--hf", str(model), "--out", str(mcore), "--overwrite"), out / "hf_to_mcore.log")
    _log(f"SmolLM2 untrained: held-out greedy accuracy {baseline:.3f}")
    runs = []
    for seed in seeds:
        prompts = write_subset(out / "data" / f"train_seed{seed}.jsonl", train_records, SMOL_TRAIN_PROMPTS, seed)
        made = cached(out / "buffers" / f"seed{seed}_done", lambda: {"accuracy": buffer_accuracy(rollout_buffer(
            model, prompts, out / "buffers" / f"seed{seed}", seed, SMOL_K, SMOL_MAX_TOKENS, "math",
            ("--chat-template",)))})
        for algorithm in ALGORITHMS:
            run = out / "runs" / f"{algorithm}_seed{seed}"
            runs.append(cached(run / "result", lambda: smol_train(run, model, mcore, out / "buffers" / f"seed{seed}",
                                                                   algorithm, seed, heldout, made["accuracy"])))
        _log(f"SmolLM2 seed {seed} (buffer accuracy {made['accuracy']:.3f}): "
             + ", ".join(f"{r['algorithm']} {r['final_accuracy']:.3f}" for r in runs[-3:]))
    return baseline, runs


def smol_train(run: Path, model: Path, mcore: Path, buffer: Path, algorithm: str, seed: int, heldout: Path,
               buffer_acc: float) -> dict:
    from rift_megatron.training.metrics import read_metrics

    if (run / "checkpoints").exists():
        shutil.rmtree(run / "checkpoints")
    config = {
        "model": {"hf_dir": str(model), "mcore_ckpt": str(mcore), "dtype": "fp32"},
        "optim": {"lr": SMOL_LR, "min_lr": 0.0, "weight_decay": 0.0, "clip_grad": 1.0, "lr_warmup_steps": 0,
                  "lr_decay_style": "constant"},
        "algorithm": {"name": algorithm, "reward": "math", "r_pos": 1.0, "r_neg": -1.0, "normalization": "per_sign"},
        "data": {"mode": "offline", "buffer": str(buffer), "chat_template": True},
        "rollout": {"engine_dtype": "float32", "max_tokens": SMOL_MAX_TOKENS},
        "training": {"steps": SMOL_STEPS, "global_batch_size": SMOL_BATCH, "micro_batch_size": 4, "seed": seed},
        "checkpoint": {"dir": str(run / "checkpoints"), "interval": 0, "keep_last": 1, "resume": "none"},
        "logging": {"dir": str(run), "tensorboard": False},
    }
    seconds = _run(_rift("train", "--config", str(_write_yaml(run / "study.yaml", config))), run / "train.log")
    accuracy = smol_eval(run / "eval.json", ["--ckpt", str(run / "checkpoints")], heldout)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    return {"algorithm": algorithm, "seed": seed, "final_accuracy": accuracy, "seconds": seconds,
            "final_loss": losses[-1], "min_loss": min(losses), "buffer_accuracy": buffer_acc}


# ----------------------------------------------------------------------------- report


def summarise(baseline: float, runs: list[dict], problems: int) -> dict:
    """Per algorithm the final accuracies over seeds, and the paired comparisons."""
    by = {a: sorted((r for r in runs if r["algorithm"] == a), key=lambda r: r["seed"]) for a in ALGORITHMS}
    seeds = sorted(set.intersection(*({r["seed"] for r in by[a]} for a in ALGORITHMS)))
    final = {a: [next(r["final_accuracy"] for r in by[a] if r["seed"] == s) for s in seeds] for a in ALGORITHMS}
    return {
        "baseline_accuracy": baseline, "heldout_problems": problems, "seeds": seeds,
        "algorithms": {a: {"mean": statistics.fmean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
                           "per_seed": v, "min_loss": min((r["min_loss"] for r in by[a]), default=None),
                           "below_baseline": sum(x < baseline for x in v),
                           "vs_baseline": paired_comparison(v, [baseline] * len(v))} for a, v in final.items()},
        "paired": {f"{a}-{b}": paired_comparison(final[a], final[b]) for a, b in COMPARISONS},
        "buffer_accuracy": [r.get("buffer_accuracy") for r in by["rift"] if r["seed"] in seeds],
        "runs": runs,
    }


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def verdict(p: dict) -> str:
    if p["ci95"] is None:
        return "not enough seeds"
    low, high = p["ci95"]
    return "**first higher**" if low > 0 else "**second higher**" if high < 0 else "no difference shown"


def markdown(results: dict) -> str:
    lines = ["# paper_study results", "", results["preamble"], ""]
    for name, setting in results["settings"].items():
        a = setting["algorithms"]
        lines += [f"## {name}", "", setting["description"], "",
                  f"Baseline (warm-up / untrained) held-out accuracy {setting['baseline_accuracy']:.3f} (its own "
                  f"evaluation standard error {binomial_se(setting['baseline_accuracy'], setting['heldout_problems']):.3f}, "
                  "not in the gain intervals below, which are over seeds); "
                  f"{setting['heldout_problems']} held-out problems; seeds {setting['seeds']}"
                  + (f"; buffer accuracy (pass@1 of the sampled buffer) {statistics.fmean(setting['buffer_accuracy']):.3f}"
                     if all(x is not None for x in setting["buffer_accuracy"]) and setting["buffer_accuracy"] else "")
                  + ".", "",
                  "| algorithm | final held-out accuracy (mean +- std) | gain over baseline [95% CI] | below baseline | min loss |",
                  "|---|---|---|---|---|"]
        for algorithm, v in a.items():
            g = v["vs_baseline"]
            ci = f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g["ci95"] else ""
            lines.append(f"| {algorithm} | {_f(v['mean'])} +- {_f(v['std'])} | {_signed(g['mean'])} {ci} | "
                         f"{v['below_baseline']}/{len(v['per_seed'])} | {_f(v['min_loss'], 4)} |")
        lines += ["", "| paired difference | mean [95% CI] | wins / losses / ties | sign test p | reading |",
                  "|---|---|---|---|---|"]
        for pair, p in setting["paired"].items():
            ci = f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p["ci95"] else ""
            lines.append(f"| {pair} | {_signed(p['mean'])} {ci} | {p['wins']} / {p['losses']} / {p['ties']} | "
                         f"{p['sign_test_p']:.3f} | {verdict(p)} |")
        lines.append("")
    lines += ["![paired differences per seed](paper_study_results.png)", "",
              f"Running time: {results['span_minutes']:.0f} min from the study's first file to its last finished run "
              f"({results['run_minutes']:.0f} min of `rift train` wall time summed over the runs), "
              f"on {results['machine']}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"].items())
    figure, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.6), sharey=True, squeeze=False)
    for axis, (name, setting) in zip(axes[0], settings):
        for x, (pair, p) in enumerate(setting["paired"].items()):
            axis.scatter([x] * len(p["differences"]), p["differences"], s=12, alpha=0.6)
            if p["ci95"]:
                axis.errorbar([x + 0.25], [p["mean"]], yerr=[[p["mean"] - p["ci95"][0]], [p["ci95"][1] - p["mean"]]],
                              fmt="o", color="black", capsize=3)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(setting["paired"])), list(setting["paired"]), rotation=30, fontsize=7)
        axis.set_title(name, fontsize=8)
    axes[0][0].set_ylabel("held-out accuracy difference per seed\n(black: mean, 95% CI)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="study_out")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per toy setting (default 10)")
    parser.add_argument("--smollm2-seeds", type=int, default=5)
    parser.add_argument("--smollm2-seed-list", type=int, nargs="+", default=None,
                        help="train only these SmolLM2 seeds (e.g. a second process on the same --out)")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct HF folder (default: the test tier's cache)")
    parser.add_argument("--parts", default="toy_offline,toy_online,smollm2")
    parser.add_argument("--warmups", default=",".join(WARMUPS))
    parser.add_argument("--jobs", type=int, default=2, help="concurrent training runs")
    parser.add_argument("--report-only", action="store_true", help="summarise the finished runs, train nothing")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    parts = args.parts.split(",")
    settings: dict[str, dict] = {}
    for warmup in filter(None, args.warmups.split(",")):
        s = toy_settings(WARMUPS[warmup], args.seeds)
        base = out / f"toy_{warmup}"
        prepared = None if args.report_only else warmed_up(base, s)
        for part in ("toy_offline", "toy_online"):
            if part not in parts:
                continue
            if args.report_only:
                runs = [r for d in sorted((base / "runs").glob(f"{part[4:]}_*")) if (r := finished(d))]
            else:
                runs = (toy_offline if part == "toy_offline" else toy_online)(base, s, prepared, args.jobs)
            if not runs:
                continue
            baseline = runs[0]["initial_accuracy"]
            if any(r["initial_accuracy"] != baseline for r in runs):
                raise SystemExit(f"{part} {warmup}: runs measured different step-0 accuracies: greedy eval must be deterministic")
            entry = summarise(baseline, runs, s.n_heldout)
            entry["description"] = (
                f"Toy task (2-digit addition, 4-layer Llama), {warmup} warm-up (SFT until validation >= "
                f"{WARMUPS[warmup]}), " + (
                    f"offline: one `rift rollout -k {s.k}` buffer of {TOY_OFFLINE_PROMPTS} prompts per seed, "
                    f"{TOY_OFFLINE_PROMPTS * s.k // s.global_batch_size * TOY_OFFLINE_EPOCHS} steps of "
                    f"{s.global_batch_size} ({TOY_OFFLINE_EPOCHS} epochs)" if part == "toy_offline" else
                    f"online: {s.iterations} iterations x {s.prompts_per_step} prompts x {s.k} samples, "
                    f"{s.online_steps} steps of {s.global_batch_size}")
                + f"; lr {s.lr}, r_pos {s.r_pos}, r_neg {s.r_neg}, {s.normalization}.")
            settings[f"{part} / {warmup}"] = entry
    if "smollm2" in parts:
        smol = out / "smollm2"
        if args.report_only:
            runs = [r for d in sorted((smol / "runs").glob("*_seed*")) if (r := finished(d / "result"))]
            baseline_file = smol / "evals" / "base_done" / "study_result.json"
            baseline = json.loads(baseline_file.read_text())["pass@1_greedy"] if baseline_file.exists() else None
        else:
            seeds = args.smollm2_seed_list or list(range(args.smollm2_seeds))
            baseline, runs = smollm2(smol, smollm2_folder(args.smollm2), seeds)
        if runs and baseline is not None:
            entry = summarise(baseline, runs, SMOL_HELDOUT)
            entry["description"] = (
                f"SmolLM2-135M-Instruct, chat template, 2-number additions, math reward; offline: one `rift rollout "
                f"-k {SMOL_K} --max-tokens {SMOL_MAX_TOKENS}` buffer of {SMOL_TRAIN_PROMPTS} prompts per seed, "
                f"{SMOL_STEPS} steps of {SMOL_BATCH}, lr {SMOL_LR}, r_pos 1, r_neg -1, per_sign; `rift eval --ckpt` greedy.")
            settings["smollm2 / offline"] = entry
    first_file, last_result, run_seconds = study_times(out)
    for entry in settings.values():  # run folders relative to --out: the results travel without it
        for run in entry["runs"]:
            if "run_dir" in run:
                run["run_dir"] = os.path.relpath(run["run_dir"], out)
    results = {
        "preamble": ("Paired over seeds (same warm-up, buffer, data order and sampling seeds per seed). "
                     "CI: Student-t 95% interval of the mean per-seed difference; sign test: exact, two-sided, "
                     "ties dropped. A difference is shown when its interval excludes 0."),
        "machine": machine(), "span_minutes": (last_result - first_file) / 60, "run_minutes": run_seconds / 60,
        "settings": settings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "paper_study_results.png")
    print(markdown(results))


def binomial_se(accuracy: float, problems: int) -> float:
    return (accuracy * (1 - accuracy) / problems) ** 0.5


def study_times(out: Path) -> tuple[float, float, float]:
    """(oldest file's creation, last finished run's mtime, sum of the runs' own seconds): the
    study's running time, also when it was interrupted and continued or run in parts."""
    files = [f for f in out.rglob("*") if f.is_file()]
    results = [f for f in files if f.name == "study_result.json"]
    seconds = sum(json.loads(f.read_text()).get("seconds", 0) for f in results)
    return (min((f.stat().st_ctime for f in files), default=0.0),  # ctime: copies keep their source mtime
            max((f.stat().st_mtime for f in results), default=0.0), seconds)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def warmed_up(base: Path, s: DemoSettings):
    """The demo's data + SFT warm-up under `base`, done once: a continued study pairs its later
    seeds with the same warm-up instead of training a new one."""
    from rift_megatron.demo.pipeline import Prepared

    record = base / "warmup.json"
    if not record.exists():
        prepared = prepare(base, s)
        record.write_text(json.dumps({"sft": prepared.sft, "timings": prepared.timings}, indent=1) + "\n")
    saved = json.loads(record.read_text())
    data = base / "data"
    return Prepared(data / "train.jsonl", data / "validation.jsonl", data / "heldout.jsonl",
                    base / "models" / "warmup", base / "models" / "warmup_mcore", saved["sft"], saved["timings"])


if __name__ == "__main__":
    main()

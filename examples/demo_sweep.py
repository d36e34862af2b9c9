"""Sweep the RIFT knobs on the demo's toy task: where (if anywhere) do negatives help?

    .venv/bin/python examples/demo_sweep.py [--out sweep_out] [--seeds 100 101] [--iterations 16]
                                            [--only base,global,...]

Each sweep point changes one thing against `base` (the demo's `DemoSettings` with the knobs
below set explicitly, so the sweep does not move when the demo's defaults do) and trains the
algorithms it concerns from the same warm-up. What is compared is the greedy accuracy on the
**validation** split at the end of each run, with seeds **different from the demo's**: the demo's
held-out set and seeds are never looked at here, so choosing the demo's default from this sweep
does not tune the demo's measurement.

    base          lr 3e-4, normalization per_sign, r_neg -0.2, no ratio cap, one epoch per rollout,
                  warm-up to validation accuracy 0.4 (the demo's defaults before this sweep)
    lr_1e-4       learning rate 1e-4 (learning rates per algorithm: compare each at its best)
    lr_1e-3       learning rate 1e-3
    global        normalization global (the paper's expectation over all non-zero-reward tokens)
    r_neg_1       r_neg -1.0 (negatives weighted like positives)
    cap_1         ratio cap C = 1 on negative tokens
    epochs_4      4 epochs over every rollout batch (the offline regime's data reuse: after the
                  first epoch the negatives' ratios move away from 1)
    hard          a weaker warm-up (validation target 0.15): correct samples are scarce, so most of
                  each batch is negatives
    lr_1e-4_r_neg_0.5, lr_1e-4_r_neg_1, epochs_4_r_neg_1
                  combinations of the above (a second round, after the first showed the most stable
                  learning rate and the only positive rift - rft at r_neg -1)

`rft` ignores negatives (and the normalisation, r_neg and ratio cap only touch them), so it is
trained only where its own inputs change. Results go to `<out>/sweep.json` and a table on stdout:
per point and algorithm, the mean (and spread over seeds) of the final validation accuracy, the
lowest loss seen, and rift - rft, against the rft run of the point that agrees on everything rft
depends on (learning rate, epochs, warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from rift_megatron.demo.pipeline import DemoSettings, prepare, run_online

# The sweep's starting point, explicit: every point below changes this.
BASE = {"lr": 3.0e-4, "normalization": "per_sign", "r_neg": -0.2, "ratio_cap": None, "epochs_per_rollout": 1,
        "warmup_target": 0.4}
# name -> (changes to BASE, algorithms to train)
POINTS = {
    "base": ({}, ("rft", "rift", "naive")),
    "lr_1e-4": ({"lr": 1.0e-4}, ("rft", "rift")),
    "lr_1e-3": ({"lr": 1.0e-3}, ("rft", "rift", "naive")),
    "global": ({"normalization": "global"}, ("rift", "naive")),
    "r_neg_1": ({"r_neg": -1.0}, ("rift", "naive")),
    "cap_1": ({"ratio_cap": 1.0}, ("rift",)),
    "epochs_4": ({"epochs_per_rollout": 4}, ("rft", "rift", "naive")),
    "hard": ({"warmup_target": 0.15}, ("rft", "rift", "naive")),
    "lr_1e-4_r_neg_0.5": ({"lr": 1.0e-4, "r_neg": -0.5}, ("rift",)),
    "lr_1e-4_r_neg_1": ({"lr": 1.0e-4, "r_neg": -1.0}, ("rift", "naive")),
    "epochs_4_r_neg_1": ({"epochs_per_rollout": 4, "r_neg": -1.0}, ("rift", "naive")),
}
# Settings that change the warm-up: points differing in them need their own.
WARMUP_KEYS = ("warmup_target", "sft_eval_interval", "sft_max_steps", "sft_batch", "sft_lr")
# Everything `rft` depends on: its comparison point must agree on these.
RFT_KEYS = WARMUP_KEYS + ("lr", "epochs_per_rollout")


def summarise(runs: list[dict]) -> dict:
    finals = [r["final_accuracy"] for r in runs]
    return {
        "validation_mean": statistics.fmean(finals),
        "validation_std": statistics.stdev(finals) if len(finals) > 1 else None,
        "validation_per_seed": finals,
        "baseline": runs[0]["initial_accuracy"],
        "min_loss": min(r["min_loss"] for r in runs),
        "final_loss_mean": statistics.fmean(r["final_loss"] for r in runs),
    }


def rft_reference(name: str, results: dict) -> dict | None:
    """The rft summary of the sweep point that trains rft with the same inputs as point `name`."""
    base = replace(DemoSettings(), **BASE)
    inputs = lambda point: {key: POINTS[point][0].get(key, getattr(base, key)) for key in RFT_KEYS}
    for other, entry in results.items():
        if "rft" in entry and inputs(other) == inputs(name):
            return entry["rft"]
    return None


def table(results: dict) -> str:
    lines = [f"{'point':<19}{'algorithm':<10}{'baseline':>9}{'valid.':>8}{'+-':>7}{'min loss':>10}{'rift-rft':>10}"]
    for name, entry in results.items():
        rft = rft_reference(name, results)
        for algorithm in ("rft", "rift", "naive"):
            if algorithm not in entry:
                continue
            a = entry[algorithm]
            std = "n/a" if a["validation_std"] is None else f"{a['validation_std']:.3f}"
            versus = f"{a['validation_mean'] - rft['validation_mean']:+.3f}" if algorithm == "rift" and rft else ""
            lines.append(f"{name:<19}{algorithm:<10}{a['baseline']:>9.3f}{a['validation_mean']:>8.3f}{std:>7}"
                         f"{a['min_loss']:>10.4f}{versus:>10}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="sweep_out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101],
                        help="training seeds (default 100 101: disjoint from the demo's)")
    parser.add_argument("--iterations", type=int, default=DemoSettings.iterations)
    parser.add_argument("--only", default=",".join(POINTS), help="comma-separated sweep points")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(POINTS)
    if unknown:
        parser.error(f"unknown sweep point(s) {sorted(unknown)}; choose from {list(POINTS)}")
    out = Path(args.out).resolve()
    base = replace(DemoSettings(), **BASE, seeds=tuple(args.seeds), iterations=args.iterations)
    warmups: dict[tuple, object] = {}
    results: dict[str, dict] = {}
    for name in args.only.split(","):
        changes, algorithms = POINTS[name]
        settings = replace(base, **changes)
        warmup_key = tuple(getattr(settings, key) for key in WARMUP_KEYS)
        if warmup_key not in warmups:
            warmups[warmup_key] = prepare(out / f"warmup_{len(warmups)}", settings)
        prepared = warmups[warmup_key]
        runs = run_online(out, settings, prepared, algorithms, tag=f"{name}_", eval_prompts=prepared.validation)
        results[name] = {"changes": changes,
                         **{a: summarise([r for r in runs if r["algorithm"] == a]) for a in algorithms}}
        (out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table(results) + f"\n\n{out / 'sweep.json'}")


if __name__ == "__main__":
    main()

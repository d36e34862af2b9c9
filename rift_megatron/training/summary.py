"""What a finished run tells its user: a short summary and a PNG of its curves.

Both are computed from `metrics.jsonl` alone (not from the trainer's memory), so a resumed run
summarises its whole history, and `summarise_run` / `plot_run` work on any finished run directory.
"""

from __future__ import annotations

from pathlib import Path

from rift_megatron.training.metrics import read_metrics

PLOT_FILE = "training.png"

# (metric key, label) of the summary's first -> last lines, in print order.
_TRACKED = (
    ("loss", "loss"),
    ("loss_pos", "loss (+ part)"),
    ("loss_neg", "loss (- part)"),
    ("reward_mean", "rollout reward"),
    ("accuracy", "rollout accuracy"),
    ("logprob_diff_max", "trainer-vs-engine |dlogp| max"),
)


def _series(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(m["step"]), float(m[key])) for m in metrics if key in m]


def eval_curve(metrics: list[dict]) -> list[tuple[int, float]]:
    """Held-out accuracy over steps: the initial eval at step 0, periodic evals, the final eval."""
    curve = [(0, float(m["initial_eval_accuracy"])) for m in metrics if "initial_eval_accuracy" in m][:1]
    curve += _series(metrics, "eval_accuracy")
    finals = _series(metrics, "final_eval_accuracy")
    if finals and (not curve or curve[-1][0] != finals[-1][0]):
        curve.append(finals[-1])
    return curve


def summarise_run(run_dir: str | Path) -> dict:
    """First and last value of each tracked metric, the eval curve's ends, and the step count."""
    metrics = read_metrics(run_dir)
    summary: dict = {"steps": max((int(m["step"]) for m in metrics), default=0)}
    for key, _ in _TRACKED:
        series = _series(metrics, key)
        if series:
            summary[key] = {"first": series[0][1], "last": series[-1][1]}
    curve = eval_curve(metrics)
    if curve:
        summary["eval_accuracy"] = {"first": curve[0][1], "last": curve[-1][1], "best": max(a for _, a in curve)}
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"run finished: {summary['steps']} optimizer steps"]
    for key, label in (*_TRACKED, ("eval_accuracy", "held-out accuracy")):
        if key in summary:
            entry = summary[key]
            line = f"  {label:<32} {entry['first']:.4g} -> {entry['last']:.4g}"
            lines.append(line + (f" (best {entry['best']:.4g})" if "best" in entry else ""))
    return "\n".join(lines)


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Reward / accuracy (top) and loss with its parts (bottom) over steps, as a PNG; None when
    the run logged no step."""
    metrics = read_metrics(run_dir)
    if not any("loss" in m for m in metrics):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, label, style in (("reward_mean", "rollout reward (mean)", "-"), ("accuracy", "rollout accuracy", "-")):
        series = _series(metrics, key)
        if series:
            top.plot(*zip(*series), style, label=label)
    curve = eval_curve(metrics)
    if curve:
        top.plot(*zip(*curve), "o-", label="held-out accuracy")
    top.set_ylabel("reward / accuracy")
    top.grid(alpha=0.3)
    for key, label in (("loss", "loss"), ("loss_pos", "+ part"), ("loss_neg", "- part")):
        series = _series(metrics, key)
        if series:
            bottom.plot(*zip(*series), label=label)
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("loss")
    bottom.grid(alpha=0.3)
    for axis in (top, bottom):
        if axis.lines:
            axis.legend(fontsize="small")
    figure.suptitle(f"{Path(run_dir).name}: reward, accuracy and loss")
    figure.tight_layout()
    target = Path(path) if path is not None else Path(run_dir) / PLOT_FILE
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target


def report_run(run_dir: str | Path) -> None:
    """Print the summary and write the plot (rank 0, at the end of `rift train`)."""
    print(format_summary(summarise_run(run_dir)))
    plot = plot_run(run_dir)
    if plot is not None:
        print(f"  curves: {plot}")

"""What a run reports: the metrics file and console cadence, the end-of-run summary and plot."""

from __future__ import annotations

import importlib.util

import pytest

from rift_megatron.training.metrics import MetricsLogger, read_metrics
from rift_megatron.training.summary import eval_curve, format_summary, plot_run, summarise_run


def _log_run(run_dir, console_interval: int = 1) -> None:
    """Four steps with an initial eval on step 1's line, a periodic eval after step 2, a final eval."""
    logger = MetricsLogger(run_dir, enabled=True, tensorboard=False, total_steps=4, console_interval=console_interval)
    for step in range(1, 5):
        metrics = {"step": step, "loss": 1.0 / step, "loss_pos": 0.8 / step, "loss_neg": 0.2 / step,
                   "reward_mean": 0.1 * step, "accuracy": 0.2 * step}
        if step == 1:
            metrics["initial_eval_accuracy"] = 0.25
        logger.log(metrics)
        if step == 2:
            logger.log({"step": 2, "eval_accuracy": 0.5})
    logger.log({"step": 4, "final_eval_accuracy": 0.75})
    logger.close()


def test_every_record_reaches_metrics_jsonl_but_the_console_only_every_interval(tmp_path, capsys):
    _log_run(tmp_path, console_interval=3)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 2, 3, 4, 4]
    lines = capsys.readouterr().out.strip().splitlines()
    # step 1 (carries the initial eval), the eval at step 2, step 3 (the interval), the final eval
    assert [line.split(" | ")[0] for line in lines] == ["step 1", "step 2", "step 3", "step 4"]
    assert "initial eval 0.250" in lines[0] and "eval 0.500" in lines[1] and "final eval 0.750" in lines[3]
    assert "loss" not in lines[1] and "loss 0.3333" in lines[2]


def test_eval_curve_runs_from_the_initial_to_the_final_eval_at_their_steps(tmp_path):
    _log_run(tmp_path)
    assert eval_curve(read_metrics(tmp_path)) == [(0, 0.25), (2, 0.5), (4, 0.75)]


def test_summary_reports_first_last_and_best(tmp_path):
    _log_run(tmp_path)
    summary = summarise_run(tmp_path)
    assert summary["steps"] == 4
    assert summary["loss"] == {"first": 1.0, "last": 0.25}
    assert summary["accuracy"] == {"first": pytest.approx(0.2), "last": pytest.approx(0.8)}
    assert summary["eval_accuracy"] == {"first": 0.25, "last": 0.75, "best": 0.75}
    text = format_summary(summary)
    assert text.splitlines()[0] == "run finished: 4 optimizer steps"
    assert "held-out accuracy" in text and "0.25 -> 0.75 (best 0.75)" in text


def test_plot_is_a_png_of_the_curves_and_absent_without_steps(tmp_path):
    _log_run(tmp_path / "run")
    path = plot_run(tmp_path / "run")
    assert path == tmp_path / "run" / "training.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    (tmp_path / "empty").mkdir()
    assert plot_run(tmp_path / "empty") is None


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_requested_but_not_installed_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"logging.wandb is true but wandb is not installed.*rift-megatron\[wandb\]"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, total_steps=1, wandb_run={"project": "p"})

"""`rift train` reports config problems as one line and exit code 2, before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rift_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "rift_megatron.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["training.stpes=3"], "unknown config key 'training.stpes'"),
        (["training.steps=ten"], "config key 'training.steps'"),
        (["algorithm.name=grpo"], "must be one of 'rift', 'rft', 'sft', 'naive'"),
        (["model.hf_dir=/nonexistent/model"], "model.hf_dir '/nonexistent/model' does not exist"),
        (["model.hf_dir=.", "parallel.tensor=2"], "does not divide the world size 1"),
        (["model.hf_dir=.", "parallel.context=2"], "parallel.context is 2 but context parallelism needs Transformer"),
        (["--resume", "/nonexistent/ckpt"], "checkpoint.resume '/nonexistent/ckpt' does not exist"),
    ],
)
def test_config_errors_are_one_line(tmp_path, overrides, expected):
    result = _rift_train(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(expected in line for line in lines), result.stderr
    # nothing but the problems: no traceback, no library warnings burying them
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, result.stderr


def test_a_failed_sync_check_stops_the_run_in_one_line(tmp_path_factory, tmp_path):
    """A push the check rejects (here: a tolerance below fp32 round-off, so the first push fails)
    ends the run before the first optimizer step, with one line naming the knob, exit 1."""
    from tests.rollout_fixtures import arithmetic_prompts, shared_tiny_model, subprocess_env, write_jsonl

    model = shared_tiny_model(tmp_path_factory)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(4))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rift_megatron.cli", "train", f"model.hf_dir={model['hf']}", f"data.prompts={prompts}",
         "data.prompts_per_step=4", "rollout.k=2", "rollout.max_tokens=8", "training.steps=2",
         "training.global_batch_size=8", "training.micro_batch_size=4", "algorithm.reward_workers=1",
         "rollout.sync_check_atol=1e-12", f"logging.dir={run_dir}", "logging.tensorboard=false"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-4000:]
    # before anything starts, the planner's prediction for this config and world (issue 16)
    assert result.stdout.startswith("planner: TP1 PP1 DP1 mbs4 recompute=none engine TP1 offload=on on 1 x H100"), \
        result.stdout[:2000]
    assert all(phase in result.stdout for phase in ("training ", "weight push ", "rollout ", "step time on 1 GPUs"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("rift train: error:")]
    assert len(errors) == 1 and "rollout.sync_check_atol" in errors[0] and "before step 1" in errors[0], result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    logged = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    assert '"loss"' not in logged  # no step was taken

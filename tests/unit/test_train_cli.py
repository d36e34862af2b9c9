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

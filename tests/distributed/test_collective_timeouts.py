"""Collective timeouts (2 gloo processes, online, one engine per rank).

Rank 0's first reward verification sleeps (tests.rollout_fixtures.late_on_rank0_reward): its rollout
finishes late, as behind a slower engine, while rank 1 has finished its own and waits.

1. The wait happens in the rollout wait group, whose timeout (`rollout.wait_timeout_minutes`) is
   sized to a rollout, not in a training collective: with `parallel.collective_timeout_minutes`
   shorter than the delay, the run still completes.
2. When the rollout wait itself exceeds its timeout, the run stops with a line naming the rank, the
   phase and the key to raise, instead of gloo's message naming a C++ file.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.distributed.launch import online_overrides, read_metrics, train_command
from tests.rollout_fixtures import REPO_ROOT, arithmetic_prompts, shared_tiny_model, subprocess_env, write_jsonl

pytestmark = pytest.mark.distributed

# Rank 0 is late by LATE_S; the training collectives' timeout is shorter than that. Both are far
# above the spread of start-up times between two ranks on a loaded 2-core machine (a few seconds
# measured; the margin allows for another test running beside this one).
LATE_S = 90
COLLECTIVE_TIMEOUT_MINUTES = 1.0   # 60 s < LATE_S
SHORT_WAIT_MINUTES = 0.5           # 30 s < LATE_S: the rollout wait times out


def _run(tmp_path, tiny_model, wait_minutes: float) -> subprocess.CompletedProcess:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(8))
    overrides = online_overrides(prompts, tmp_path / "run", 2, **{
        "model.hf_dir": tiny_model["hf"], "model.mcore_ckpt": tiny_model["mcore"],
        "algorithm.reward": "tests.rollout_fixtures:late_on_rank0_reward", "algorithm.reward_timeout_s": LATE_S + 60,
        "parallel.collective_timeout_minutes": COLLECTIVE_TIMEOUT_MINUTES, "rollout.wait_timeout_minutes": wait_minutes,
        "rollout.engine_dtype": "float32"})
    env = subprocess_env(RIFT_TEST_REWARD_MARKER_DIR=str(tmp_path), RIFT_TEST_REWARD_SLEEP_S=str(LATE_S))
    return subprocess.run(train_command(overrides, 2), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900)


def test_a_late_rollout_waits_outside_the_training_collectives(tmp_path, tmp_path_factory) -> None:
    result = _run(tmp_path, shared_tiny_model(tmp_path_factory), wait_minutes=5)
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "slept").exists()  # rank 0 really was late
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    # rank 1 waited LATE_S for rank 0's first rollout, longer than a training collective may take
    assert [m["step"] for m in steps] == [1, 2]


def test_a_rollout_wait_past_its_timeout_names_the_rank_phase_and_key(tmp_path, tmp_path_factory) -> None:
    result = _run(tmp_path, shared_tiny_model(tmp_path_factory), wait_minutes=SHORT_WAIT_MINUTES)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("rift train: rank 1:")]
    assert lines, result.stderr[-6000:]
    assert "during the rollout" in lines[0] and "rollout.wait_timeout_minutes" in lines[0], lines[0]

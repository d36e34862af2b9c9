"""Interrupt-and-resume reproduces the uninterrupted online run exactly (CPU, one process).

Run A trains 4 steps with a checkpoint every 2; run B is A's checkpoint directory rewound to
step 2 (its `latest` pointer moved back, the later iteration deleted, a half-written checkpoint
directory left behind as a crash mid-write would), resumed with `checkpoint.resume=auto`. Every
logged number that is not a wall-clock measurement must be identical for steps 3 and 4: model,
optimizer (Adam moments and step), LR schedule, sampler position, rollout counter and the
engine's seed stream all come back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.rollout_fixtures import REPO_ROOT, arithmetic_prompts, shared_tiny_model, subprocess_env, write_jsonl

pytestmark = pytest.mark.distributed

TIMING_KEYS = {"generation_tokens_per_s", "sync_seconds", "train_seconds"}


def _train(model, prompts, run_dir, checkpoints):
    overrides = [
        f"model.hf_dir={model['hf']}", f"model.mcore_ckpt={model['mcore']}",
        "optim.lr=1e-3", "optim.lr_decay_style=cosine", "optim.lr_decay_steps=4",
        "algorithm.reward=exact", "algorithm.reward_workers=1",
        f"data.prompts={prompts}", "data.prompts_per_step=4", "rollout.k=2", "rollout.max_tokens=8",
        "rollout.engine_dtype=float32", "training.steps=4", "training.global_batch_size=8",
        "training.micro_batch_size=4", f"checkpoint.dir={checkpoints}", "checkpoint.interval=2",
        "checkpoint.keep_last=5", f"logging.dir={run_dir}", "logging.tensorboard=false",
    ]
    result = subprocess.run([sys.executable, "-m", "rift_megatron.cli", "train", *overrides],
                            env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = shared_tiny_model(tmp_path_factory)
    work = tmp_path_factory.mktemp("resume")
    prompts = write_jsonl(work / "prompts.jsonl", arithmetic_prompts(12))
    uninterrupted = _train(model, prompts, work / "a", work / "a_ckpt")
    # Rewind a copy to step 2, as if the run had died during its step-4 checkpoint write.
    shutil.copytree(work / "a_ckpt", work / "b_ckpt")
    shutil.rmtree(work / "b_ckpt" / "iter_0000004")
    (work / "b_ckpt" / "latest").write_text("iter_0000002\n")
    (work / "b_ckpt" / ".iter_0000004.partial").mkdir()
    shutil.copytree(work / "a", work / "b")
    resumed = _train(model, prompts, work / "b", work / "b_ckpt")
    return uninterrupted, resumed


def _by_step(history):
    return {m["step"]: {k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history if "loss" in m}


def test_resumed_run_logs_exactly_what_the_uninterrupted_run_logged(runs):
    uninterrupted, resumed = (_by_step(h) for h in runs)
    assert sorted(uninterrupted) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == uninterrupted[step], step
    # the comparison has teeth: consecutive steps differ
    assert uninterrupted[3]["loss"] != uninterrupted[4]["loss"]

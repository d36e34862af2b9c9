"""Interrupt-and-resume reproduces the uninterrupted online run (CPU).

Run A trains 4 steps with a checkpoint every 2, in one process; run B is A's checkpoint
directory rewound to step 2 (its `latest` pointer moved back, the later iteration deleted, a
half-written checkpoint directory left behind as a crash mid-write would), resumed with
`checkpoint.resume=auto`. Every logged number that is not a measurement of the machine (wall
clock, memory) must be identical for steps 3 and 4: model, optimizer (Adam moments and step),
LR schedule, sampler position, rollout counter and the engine's seed stream all come back.

Run C resumes the same step-2 checkpoint with `--resume auto` on two processes (data-parallel
size 2, the distributed optimizer's state resharded from one rank to two, one engine per rank):
the same samples are drawn (request seeds depend on the global prompt index only) and the
losses agree with A's to fp32 round-off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.rollout_fixtures import REPO_ROOT, arithmetic_prompts, shared_tiny_model, subprocess_env, write_jsonl

pytestmark = pytest.mark.distributed

# Measurements of the machine, not of the training: wall-clock times and the process's memory.
TIMING_KEYS = {"generation_tokens_per_s", "sync_seconds", "train_seconds", "cpu_rss_gib"}
# DP2 vs DP1: the same samples, gradients all-reduced over two ranks instead of summed on one.
# Same tolerance and reasoning as test_train_layouts.LAYOUT_RTOL (fp32 summation order, a few ulp
# per step, amplified a little by Adam); a lost or duplicated sample, a wrongly resharded Adam
# state or a sampler that restarted would move these by 1e-3 .. 1.
DP_RTOL = 1e-5
DP_COMPARED = ("loss", "loss_pos", "loss_neg", "tokens", "grad_norm", "reward_mean", "accuracy", "generation_tokens")


def _train(model, prompts, run_dir, checkpoints, nproc: int = 1, resume: str | None = None):
    overrides = [
        f"model.hf_dir={model['hf']}", f"model.mcore_ckpt={model['mcore']}",
        "optim.lr=1e-3", "optim.lr_decay_style=cosine", "optim.lr_decay_steps=4",
        "algorithm.reward=exact", "algorithm.reward_workers=1",
        f"data.prompts={prompts}", "data.prompts_per_step=4", "rollout.k=2", "rollout.max_tokens=8",
        "rollout.engine_dtype=float32", "training.steps=4", "training.global_batch_size=8",
        "training.micro_batch_size=4", f"checkpoint.dir={checkpoints}", "checkpoint.interval=2",
        "checkpoint.keep_last=5", f"logging.dir={run_dir}", "logging.tensorboard=false",
    ]
    if resume is not None:
        overrides += ["--resume", resume]
    launcher = (["-m", "rift_megatron.cli", "train"] if nproc == 1 else
                ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rift_megatron.train"])
    result = subprocess.run([sys.executable, *launcher, *overrides],
                            env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rewind_to_step_2(work, name: str) -> None:
    """A copy of run A's checkpoints and logs as they were when A died writing its step-4 checkpoint."""
    shutil.copytree(work / "a_ckpt", work / f"{name}_ckpt")
    shutil.rmtree(work / f"{name}_ckpt" / "iter_0000004")
    (work / f"{name}_ckpt" / "latest").write_text("iter_0000002\n")
    (work / f"{name}_ckpt" / ".iter_0000004.partial").mkdir()
    shutil.copytree(work / "a", work / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = shared_tiny_model(tmp_path_factory)
    work = tmp_path_factory.mktemp("resume")
    prompts = write_jsonl(work / "prompts.jsonl", arithmetic_prompts(12))
    uninterrupted = _train(model, prompts, work / "a", work / "a_ckpt")
    _rewind_to_step_2(work, "b")
    resumed = _train(model, prompts, work / "b", work / "b_ckpt")
    _rewind_to_step_2(work, "c")
    resumed_dp2 = _train(model, prompts, work / "c", work / "c_ckpt", nproc=2, resume="auto")
    return {"a": uninterrupted, "b": resumed, "c": resumed_dp2, "work": work}


def _by_step(history):
    return {m["step"]: {k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history if "loss" in m}


def test_resumed_run_logs_exactly_what_the_uninterrupted_run_logged(runs):
    uninterrupted, resumed = _by_step(runs["a"]), _by_step(runs["b"])
    assert sorted(uninterrupted) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == uninterrupted[step], step
    # the comparison has teeth: consecutive steps differ
    assert uninterrupted[3]["loss"] != uninterrupted[4]["loss"]


def test_resume_at_data_parallel_size_2_continues_the_same_run(runs):
    uninterrupted, resumed = _by_step(runs["a"]), _by_step(runs["c"])
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in DP_COMPARED:
            a, c = uninterrupted[step][key], resumed[step][key]
            assert abs(a - c) <= DP_RTOL * max(abs(a), 1e-12), (step, key, a, c)
    state = json.loads((runs["work"] / "c_ckpt" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["rollout_step"] == 4

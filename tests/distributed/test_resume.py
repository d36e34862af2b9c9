"""Interrupt-and-resume reproduces the uninterrupted online run (CPU).

Run A trains 4 steps in one process, uninterrupted, on a reward both signs hit. Run K is the same
run with a checkpoint after every step written in the background (`checkpoint.async_save=true`:
a forked writer process, finalised at a later step), killed (SIGKILL to its whole process group,
writers included) while its step-3 checkpoint is being written: a hook blocks the writer process
inside the tensor write, so the kill point does not depend on the machine's speed, and the kill
comes only after K has logged step 4, i.e. training went on during the write. The staging
directory `.iter_0000003.partial` exists, `latest` still names the complete step-2 checkpoint.
Run B resumes K's directories with `--resume auto` in one process: every logged number that is
not a measurement of the machine (wall clock, memory) must be identical to A's for steps 3 and 4:
model, optimizer (Adam moments and step), LR schedule, sampler position, rollout counter and the
engine's seed stream all come back, and background writes neither perturb training nor store
anything but the state at their step. B's `model.mcore_ckpt` (the initial weights) is a copy
with a damaged tensor file, which any load refuses: a resume must neither load nor convert them.

Run C resumes a copy of K's directories on two processes (data-parallel size 2, the distributed
optimizer's state resharded from one rank to two, one engine per rank): the same samples are
drawn (request seeds depend on the global prompt index only) and the losses agree with A's to
fp32 round-off.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.launch import blocking_checkpoint_env, read_metrics, train_command
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


def _command(model, prompts, run_dir, checkpoints, nproc: int = 1, interval: int = 2,
             resume: str | None = None, initial: Path | None = None, background: bool = False) -> list[str]:
    overrides = [
        f"model.hf_dir={model['hf']}", f"model.mcore_ckpt={initial or model['mcore']}",
        "optim.lr=1e-3", "optim.lr_decay_style=cosine", "optim.lr_decay_steps=4",
        # both reward signs (a random-init model never satisfies `exact`: negatives only)
        "algorithm.reward=tests.rollout_fixtures:parity_reward", "algorithm.reward_workers=1",
        f"data.prompts={prompts}", "data.prompts_per_step=4", "rollout.k=2", "rollout.max_tokens=8",
        "rollout.engine_dtype=float32", "training.steps=4", "training.global_batch_size=8",
        "training.micro_batch_size=4", f"checkpoint.dir={checkpoints}", f"checkpoint.interval={interval}",
        "checkpoint.keep_last=5", f"logging.dir={run_dir}", "logging.tensorboard=false",
    ]
    if background:
        overrides += ["checkpoint.async_save=true"]
    if resume is not None:
        overrides += ["--resume", resume]
    return train_command(overrides, nproc)


def _train(model, prompts, run_dir, checkpoints, **options) -> list[dict]:
    result = subprocess.run(_command(model, prompts, run_dir, checkpoints, **options), env=subprocess_env(),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return read_metrics(run_dir)




def _kill_during_background_checkpoint_write(model, prompts, run_dir, checkpoints, step: int) -> None:
    """Start the run with a background checkpoint every step; SIGKILL its process group while the
    writer of its step-`step` checkpoint is writing, once the run has logged step `step + 1`."""
    env, marker = blocking_checkpoint_env(run_dir.parent / f"{run_dir.name}_hook", f"iter_{step:07d}", during="write")
    process = subprocess.Popen(_command(model, prompts, run_dir, checkpoints, interval=1, background=True), env=env,
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    metrics = run_dir / "metrics.jsonl"

    def trained_past_the_save() -> bool:
        return metrics.exists() and any(m.get("step") == step + 1 and "loss" in m for m in read_metrics(run_dir))

    deadline = time.monotonic() + 900
    while not (marker.exists() and trained_past_the_save()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert marker.exists() and process.returncode == -signal.SIGKILL, (
        f"the run did not block in its step-{step} checkpoint write:\n{stderr[-4000:]}")
    assert trained_past_the_save(), f"step {step + 1} was not trained while the step-{step} checkpoint was written"


def _damaged_copy(checkpoint: Path, copy: Path) -> Path:
    """`checkpoint` with one byte of a tensor file changed (its recorded checksum no longer matches)."""
    shutil.copytree(checkpoint, copy)
    tensor_file = sorted(copy.glob("*.distcp"))[0]
    data = bytearray(tensor_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = shared_tiny_model(tmp_path_factory)
    work = tmp_path_factory.mktemp("resume")
    prompts = write_jsonl(work / "prompts.jsonl", arithmetic_prompts(12))
    uninterrupted = _train(model, prompts, work / "a", work / "a_ckpt")
    _kill_during_background_checkpoint_write(model, prompts, work / "b", work / "b_ckpt", step=3)
    killed = {"latest": (work / "b_ckpt" / "latest").read_text().strip(),
              "entries": sorted(p.name for p in (work / "b_ckpt").iterdir())}
    shutil.copytree(work / "b_ckpt", work / "c_ckpt")
    shutil.copytree(work / "b", work / "c")
    damaged = _damaged_copy(Path(model["mcore"]), work / "damaged_initial")
    resumed = _train(model, prompts, work / "b", work / "b_ckpt", resume="auto", initial=damaged)
    resumed_dp2 = _train(model, prompts, work / "c", work / "c_ckpt", nproc=2, resume="auto", initial=damaged)
    return {"a": uninterrupted, "b": resumed, "c": resumed_dp2, "killed": killed, "work": work, "damaged": damaged}


def test_a_resume_reads_no_initial_weights(runs):
    """The resumed runs B and C were given initial weights that any load refuses (checked here) and
    finished with the uninterrupted run's numbers: they did not read them."""
    from rift_megatron.trust.admission import admit_checkpoint
    from rift_megatron.trust.errors import UntrustedCheckpointError

    with pytest.raises(UntrustedCheckpointError):
        admit_checkpoint(runs["damaged"])


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_current(runs):
    killed = runs["killed"]
    assert killed["latest"] == "iter_0000002"
    assert ".iter_0000003.partial" in killed["entries"] and "iter_0000003" not in killed["entries"], killed
    assert {"iter_0000001", "iter_0000002"} <= set(killed["entries"])


def _by_step(history):
    return {m["step"]: {k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history if "loss" in m}


def test_resumed_run_logs_exactly_what_the_uninterrupted_run_logged(runs):
    uninterrupted, resumed = _by_step(runs["a"]), _by_step(runs["b"])
    assert sorted(uninterrupted) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == uninterrupted[step], step
    # the comparison has teeth: both reward signs train, and what is compared changes every step
    for step in (1, 2, 3, 4):
        assert uninterrupted[step]["loss_pos"] != 0.0 and uninterrupted[step]["loss_neg"] != 0.0, uninterrupted[step]
    for key in ("loss", "loss_pos", "loss_neg", "grad_norm", "logprob_mean_pos", "logprob_mean_neg"):
        values = [uninterrupted[step][key] for step in (1, 2, 3, 4)]
        assert len(set(values)) == 4, (key, values)


def test_resume_at_data_parallel_size_2_continues_the_same_run(runs):
    uninterrupted, resumed = _by_step(runs["a"]), _by_step(runs["c"])
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in DP_COMPARED:
            a, c = uninterrupted[step][key], resumed[step][key]
            assert abs(a - c) <= DP_RTOL * max(abs(a), 1e-12), (step, key, a, c)
    state = json.loads((runs["work"] / "c_ckpt" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["rollout_step"] == 4

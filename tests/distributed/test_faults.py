"""Faults a training run survives (CPU, real `rift train` processes on the tiny model, offline).

1. Non-finite gradients: a learning rate of 1e30 makes Adam's first update ~1e30 per weight, so
   from step 2 on the forward pass overflows and the loss and gradients are NaN / inf (a real
   blow-up, nothing injected). Every such step is skipped (logged `nonfinite` 1, `skipped` 1),
   the weights stay those of step 1, and after `training.max_consecutive_nonfinite` (3) in a row
   the run stops in one line, exit 1, having saved those weights.
2. SIGTERM (Slurm pre-emption) and SIGINT (Ctrl-C) during training: a checkpoint at the next step,
   one line naming the signal and the checkpoint, exit 128 + signal; `--resume auto` continues
   with exactly the losses of a run that was never interrupted. A second Ctrl-C stops at once
   (one line, exit 130, no traceback).
3. `kill -9` at seeded random points (possibly inside a checkpoint write): `latest` never names a
   partial checkpoint and resuming ends exactly where an uninterrupted run ends.
4. A checkpoint directory that cannot be written is refused before the first step (one line,
   exit 2); the free-space estimate it is checked against matches a real checkpoint's size.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import blocking_checkpoint_env, read_metrics, train_command
from tests.rollout_fixtures import REPO_ROOT, arithmetic_prompts, scored_buffer, shared_tiny_model, subprocess_env
from tests.stored_checkpoint import stored_tensors

pytestmark = pytest.mark.distributed

# Bounded time from the signal to the exit: one optimizer step of this tiny model (~0.1 s) plus the
# checkpoint write and shutdown (a few s); generous for a loaded 2-core CI machine.
STOP_WITHIN_S = 60
COMPARED = ("loss", "loss_pos", "loss_neg", "grad_norm", "tokens", "lr")


@pytest.fixture(scope="module")
def offline_setup(tmp_path_factory) -> dict:
    model = shared_tiny_model(tmp_path_factory)
    work = tmp_path_factory.mktemp("faults")
    return {"model": model, "work": work,
            "buffer": scored_buffer(model["hf"], arithmetic_prompts(16, seed=3), work / "buffer")}


def _overrides(setup: dict, run_dir: Path, steps: int, **settings) -> list[str]:
    base = {
        "model.hf_dir": setup["model"]["hf"], "model.mcore_ckpt": setup["model"]["mcore"],
        "data.mode": "offline", "data.buffer": setup["buffer"], "optim.lr": 1e-3,
        "optim.lr_decay_style": "constant", "optim.lr_warmup_steps": 0, "training.steps": steps,
        "training.global_batch_size": 4, "training.micro_batch_size": 2, "rollout.sync_check": "false",
        "checkpoint.dir": run_dir / "checkpoints", "checkpoint.keep_last": 10, "logging.dir": run_dir,
        "logging.tensorboard": "false", **settings,
    }
    return [f"{key}={value}" for key, value in base.items()]


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "loss" in m]


def _stderr_lines(result_stderr: str) -> list[str]:
    """stderr without the CPU path's expected library warnings (Megatron's Apex / TE notices)."""
    lines = [line for line in result_stderr.splitlines() if line.strip()]
    return [line for line in lines if "warn" not in line.lower() and not line.startswith("  ")]


def test_nonfinite_steps_are_skipped_with_weights_unchanged_then_the_run_stops(offline_setup) -> None:
    run_dir = offline_setup["work"] / "nonfinite"
    result = subprocess.run(
        train_command(_overrides(offline_setup, run_dir, 20, **{"optim.lr": 1e30, "checkpoint.interval": 1}), 1),
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = _stderr_lines(result.stderr)[-1]
    assert "steps 2-4 all had non-finite gradients" in last and "max_consecutive_nonfinite 3" in last, last
    steps = _steps(run_dir)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert steps[0]["nonfinite"] == 0 and steps[0]["skipped"] == 0
    for m in steps[1:]:
        assert m["nonfinite"] == 1 and m["skipped"] == 1, m
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip().endswith("iter_0000004")
    after_step_1, saved_at_stop = stored_tensors(checkpoints / "iter_0000001"), stored_tensors(checkpoints / "iter_0000004")
    assert after_step_1.keys() == saved_at_stop.keys() and after_step_1
    for name, tensor in after_step_1.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, saved_at_stop[name]), f"{name} changed during skipped steps"
    # the blow-up is real: step 1 moved the weights by ~lr (Adam's first update is lr x sign(g))
    assert max(float(t.abs().max()) for t in after_step_1.values()) > 1e29


def _interrupt(setup: dict, run_dir: Path, signals: tuple[int, ...],
               env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Start a long run, send `signals` once it has logged two steps (each after the previous one
    was seen: the next callable in `signals` waits for it); its result and the seconds from the
    first signal to its exit."""
    process = subprocess.Popen(train_command(_overrides(setup, run_dir, 100000), 1), env=env or subprocess_env(),
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(process, lambda: metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 2)
    sent = time.monotonic()
    for item in signals:
        if callable(item):
            _wait_for(process, item)
        else:
            process.send_signal(item)
    stdout, stderr = process.communicate(timeout=STOP_WITHIN_S + 60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), time.monotonic() - sent


def _wait_for(process: subprocess.Popen, condition, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"waited {timeout} s in vain"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_resume_continues_exactly(offline_setup, signum: int) -> None:
    name = signal.Signals(signum).name
    run_dir = offline_setup["work"] / f"signal_{name}"
    result, seconds = _interrupt(offline_setup, run_dir, (signum,))
    assert result.returncode == 128 + signum, result.stderr[-4000:]
    assert seconds < STOP_WITHIN_S
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = _stderr_lines(result.stderr)[-1]
    stopped_at = _steps(run_dir)[-1]["step"]
    assert f"stopped by {name} at step {stopped_at}" in last and "--resume auto" in last, last
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip().endswith(f"iter_{stopped_at:07d}")

    # resume to 3 steps past the stop; an uninterrupted run to the same step is the reference
    target = stopped_at + 3
    resumed = subprocess.run(train_command(_overrides(offline_setup, run_dir, target) + ["--resume", "auto"], 1),
                             env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reference_dir = offline_setup["work"] / f"reference_{name}"
    reference = subprocess.run(train_command(_overrides(offline_setup, reference_dir, target), 1),
                               env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-4000:]
    after = {m["step"]: m for m in _steps(run_dir) if m["step"] > stopped_at}
    expected = {m["step"]: m for m in _steps(reference_dir) if m["step"] > stopped_at}
    assert sorted(after) == sorted(expected) == list(range(stopped_at + 1, target + 1))
    for step in expected:
        assert {k: after[step][k] for k in COMPARED} == {k: expected[step][k] for k in COMPARED}, step
    assert len({expected[step]["loss"] for step in expected}) > 1  # the compared numbers do move


def test_a_second_ctrl_c_stops_at_once_in_one_line(offline_setup) -> None:
    """The first Ctrl-C starts the checkpoint; the second arrives while it is being written (a
    hook holds the write before its final rename): the run stops at once, the half-written
    checkpoint never becomes `latest`."""
    run_dir = offline_setup["work"] / "double_sigint"
    env, marker = blocking_checkpoint_env(offline_setup["work"] / "double_sigint_hook", "any")
    result, seconds = _interrupt(offline_setup, run_dir, (signal.SIGINT, marker.exists, signal.SIGINT), env=env)
    assert result.returncode == 130, result.stderr[-4000:]
    assert seconds < STOP_WITHIN_S
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = _stderr_lines(result.stderr)[-1]
    assert "interrupted" in last and "without saving" in last, last
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])  # the log is intact


def test_an_unwritable_checkpoint_dir_is_refused_before_the_first_step(offline_setup) -> None:
    run_dir = offline_setup["work"] / "unwritable"
    blocker = offline_setup["work"] / "a_file"
    blocker.write_text("not a directory\n")
    overrides = _overrides(offline_setup, run_dir, 4) + [f"checkpoint.dir={blocker / 'checkpoints'}"]
    result = subprocess.run(train_command(overrides, 1), env=subprocess_env(), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = _stderr_lines(result.stderr)[-1]
    assert "checkpoint.dir" in last and str(blocker) in last and "not writable" in last, last
    assert not (run_dir / "metrics.jsonl").exists() or not _steps(run_dir)


def test_the_free_space_estimate_covers_a_real_checkpoint_and_a_full_disk_is_refused(offline_setup) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from rift_megatron.config import ConfigError
    from rift_megatron.convert.dcp_reader import read_metadata
    from rift_megatron.training.preflight import check_checkpoint_dir, checkpoint_bytes

    run_dir = offline_setup["work"] / "one_step"
    result = subprocess.run(train_command(_overrides(offline_setup, run_dir, 1), 1), env=subprocess_env(),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = run_dir / "checkpoints" / "iter_0000001"
    parameters = sum(math.prod(value.size) for key, value in read_metadata(checkpoint).state_dict_metadata.items()
                     if not key.startswith("optimizer.") and isinstance(value, TensorStorageMetadata))
    tensors_on_disk = sum(path.stat().st_size for path in checkpoint.glob("*.distcp"))
    # fp32 weights + the distributed optimizer's fp32 copy + Adam's two moments: 16 bytes each;
    # measured 0.98 on this model (storage headers make the files a little larger). Without the
    # distributed optimizer's copy it would be 0.74.
    estimate = checkpoint_bytes(parameters, weight_bytes=4, distributed_optimizer=True)
    assert 0.9 < estimate / tensors_on_disk < 1.1, (estimate, tensors_on_disk)
    # a checkpoint larger than the disk is refused in one line naming the directory
    free = shutil.disk_usage(run_dir).free
    with pytest.raises(ConfigError, match=r"checkpoint.dir .* GiB free, one checkpoint of this model needs"):
        check_checkpoint_dir(run_dir / "checkpoints", needed_bytes=2 * free)
    check_checkpoint_dir(run_dir / "checkpoints", needed_bytes=estimate)  # and a real one is not


KILL_TRIALS = (0, 1, 2)
KILL_RUN_STEPS = 6


@pytest.fixture(scope="module")
def uninterrupted(offline_setup) -> dict[int, dict]:
    run_dir = offline_setup["work"] / "uninterrupted"
    result = subprocess.run(train_command(_overrides(offline_setup, run_dir, KILL_RUN_STEPS, **{"checkpoint.interval": 1}), 1),
                            env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {m["step"]: m for m in _steps(run_dir)}


@pytest.mark.parametrize("trial", KILL_TRIALS)
def test_kill_9_at_a_random_point_then_resume_gives_the_uninterrupted_result(offline_setup, uninterrupted, trial) -> None:
    """SIGKILL after a seeded random number of logged steps plus a seeded random delay (a
    checkpoint is written after every step, so a kill may land inside a write; test_resume.py
    kills deterministically inside one); `latest`, if any, names a complete checkpoint, and
    resuming ends with exactly the uninterrupted run's last step."""
    rng = random.Random(trial)
    after_steps, delay = rng.randint(1, KILL_RUN_STEPS - 2), rng.uniform(0.0, 0.4)
    run_dir = offline_setup["work"] / f"killed_{trial}"
    overrides = _overrides(offline_setup, run_dir, KILL_RUN_STEPS, **{"checkpoint.interval": 1})
    process = subprocess.Popen(train_command(overrides, 1), env=subprocess_env(), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(process, lambda: metrics.exists() and sum('"loss"' in l for l in metrics.read_text().splitlines()) >= after_steps)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and every process it started
    process.communicate(timeout=60)
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / "latest"
    if latest.exists():  # what `latest` names is complete: its metadata and trainer state are there
        named = checkpoints / latest.read_text().strip()
        assert (named / ".metadata").is_file() and (named / "trainer_state.json").is_file(), sorted(named.iterdir())
    resumed = subprocess.run(train_command(overrides + ["--resume", "auto"], 1), env=subprocess_env(), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    final = _steps(run_dir)[-1]
    assert final["step"] == KILL_RUN_STEPS
    assert {k: final[k] for k in COMPARED} == {k: uninterrupted[KILL_RUN_STEPS][k] for k in COMPARED}


# Loaded by the run's interpreter (sitecustomize on PYTHONPATH): vLLM's LLM.generate raises vLLM's
# own EngineDeadError on its Nth call, as when the engine core dies mid-rollout.
_ENGINE_DIES_HOOK = """
import os
import vllm
from vllm.v1.engine.exceptions import EngineDeadError
_generate = vllm.LLM.generate
_calls = [0]
def _dying_generate(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == int(os.environ["RIFT_TEST_ENGINE_DIES_AT_CALL"]):
        raise EngineDeadError()
    return _generate(self, *args, **kwargs)
vllm.LLM.generate = _dying_generate
"""


def test_an_engine_dying_mid_rollout_is_named_and_resume_continues(offline_setup) -> None:
    from tests.distributed.launch import online_overrides
    from tests.rollout_fixtures import write_jsonl

    work = offline_setup["work"] / "engine_dies"
    hook = work / "hook"
    hook.mkdir(parents=True)
    (hook / "sitecustomize.py").write_text(_ENGINE_DIES_HOOK)
    env = subprocess_env(RIFT_TEST_ENGINE_DIES_AT_CALL="3")  # the first 2 rollouts succeed
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    prompts = write_jsonl(work / "prompts.jsonl", arithmetic_prompts(8))
    overrides = online_overrides(prompts, work / "run", 4, **{
        "model.hf_dir": offline_setup["model"]["hf"], "model.mcore_ckpt": offline_setup["model"]["mcore"],
        "rollout.engine_dtype": "float32", "checkpoint.dir": work / "checkpoints", "checkpoint.interval": 1})
    died = subprocess.run(train_command(overrides, 1), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert died.returncode == 1, died.stderr[-4000:]
    assert "Traceback" not in died.stderr, died.stderr[-4000:]
    last = _stderr_lines(died.stderr)[-1]
    assert "rank 0: the rollout engine failed while generating rollout 2 (EngineDeadError" in last, last
    assert (work / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    resumed = subprocess.run(train_command(overrides + ["--resume", "auto"], 1), env=subprocess_env(), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [m["step"] for m in _steps(work / "run")][-2:] == [3, 4]

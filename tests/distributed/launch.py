"""Launch a worker script under torchrun (real processes, gloo) from a pytest test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.environment import REPO_ROOT, subprocess_env


def run_torchrun(script: Path, nproc: int, spec: dict, work_dir: Path, timeout: float = 600) -> None:
    """Run `script --spec <json>` on `nproc` local processes; raise with the output on failure."""
    spec_path = work_dir / f"spec-{nproc}-{len(list(work_dir.glob('spec-*')))}.json"
    spec_path.write_text(json.dumps(spec))
    env = subprocess_env()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(script), "--spec", str(spec_path),
    ]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} x{nproc} failed ({result.returncode}):\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
        )


def train_command(overrides: list[str], nproc: int) -> list[str]:
    """`rift train` as a user launches it: `torchrun --nproc-per-node N -m rift_megatron.train` (the
    CLI itself for one process) with dotted overrides / flags."""
    launcher = (["-m", "rift_megatron.cli", "train"] if nproc == 1 else
                ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rift_megatron.train"])
    return [sys.executable, *launcher, *overrides]


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_train(overrides: list[str], nproc: int, run_dir: Path, timeout: float = 900, env: dict | None = None) -> list[dict]:
    """Run `train_command` (in `env`, default `subprocess_env()`), fail the test with its output
    unless it exits 0 in time; its metrics. A run that does not finish in time (a hang) fails
    with its output so far."""
    try:
        result = subprocess.run(train_command(overrides, nproc), env=env or subprocess_env(), cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"rift train x{nproc} did not finish in {timeout:.0f} s (a hang?):\n{error.stderr}") from None
    assert result.returncode == 0, f"rift train x{nproc} failed ({result.returncode}):\n{result.stderr[-8000:]}"
    return read_metrics(run_dir)


def online_overrides(prompts: Path, run_dir: Path, steps: int, **settings) -> list[str]:
    """Dotted overrides of a short online run: 4 prompts x 2 samples of <= 8 tokens per step, one
    optimizer step of 8 samples in micro-batches of 2, lr 1e-3; `settings` (dotted key -> value)
    add to or replace them."""
    base = {"optim.lr": "1e-3", "algorithm.reward": "exact", "algorithm.reward_workers": 1,
            "data.prompts": prompts, "data.prompts_per_step": 4, "rollout.k": 2, "rollout.max_tokens": 8,
            "training.steps": steps, "training.global_batch_size": 8, "training.micro_batch_size": 2,
            "logging.dir": run_dir, "logging.tensorboard": "false"}
    return [f"{key}={value}" for key, value in {**base, **settings}.items()]


def online_run(work: Path, nproc: int, steps: int, timeout: float = 900, env: dict | None = None, **settings) -> dict:
    """A short online run (`online_overrides` + `settings`) on 8 arithmetic prompts in `work`;
    returns {"metrics", "work"} (the run directory is work/run)."""
    from tests.rollout_fixtures import arithmetic_prompts, write_jsonl

    prompts = write_jsonl(work / "prompts.jsonl", arithmetic_prompts(8))
    overrides = online_overrides(prompts, work / "run", steps, **settings)
    return {"metrics": run_train(overrides, nproc, work / "run", timeout=timeout, env=env), "work": work}


def memory_log_env(log: Path) -> dict:
    """The environment of a run that records its device-memory handoff events (engine sleep /
    wake, trainer offload / reload, pushes, generation, steps, checkpoints) in `log.<rank>`
    (tests/distributed/memory_log/sitecustomize.py)."""
    import os

    env = subprocess_env(RIFT_TEST_MEMORY_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).with_name("memory_log")), env["PYTHONPATH"]])
    return env


# Loaded by a run's interpreter (sitecustomize on PYTHONPATH): the checkpoint whose directory is
# named RIFT_TEST_BLOCK_AT ("any": the first one written) blocks at RIFT_TEST_BLOCK_DURING and says
# so in a marker file, so a test's kill or signal lands at the same point of the write on any
# machine (no polling race). "rename": right before its staging directory is renamed into place;
# "write": inside Megatron's writer process while it writes the tensors (with checkpoint.async_save
# that process runs in the background and training goes on).
_BLOCK_HOOK = """
import os, time
import rift_megatron.staging as staging
import rift_megatron.training.checkpoint_writer as checkpoint_writer

def _block(name):
    if os.environ["RIFT_TEST_BLOCK_AT"] in ("any", name):
        open(os.environ["RIFT_TEST_BLOCKED_MARKER"], "w").close()
        time.sleep(3600)

_replace = staging.replace_directory
def _blocking_replace(source, destination):
    if os.environ["RIFT_TEST_BLOCK_DURING"] == "rename":
        _block(os.path.basename(str(destination)))
    return _replace(source, destination)
staging.replace_directory = _blocking_replace

_save = checkpoint_writer.CheckpointWriter.save
def _save_with_blocking_writer(self, sharded_state_dict, staging_dir, finalize):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    write = FileSystemWriterAsync.write_preloaded_data
    if os.environ["RIFT_TEST_BLOCK_DURING"] == "write" and not getattr(write, "blocking", False):
        def blocking_write(transform_list, *args, **kwargs):
            _block(os.path.basename(os.path.dirname(kwargs["write_bucket"][0]))[1:-len(".partial")])
            return write(transform_list, *args, **kwargs)
        blocking_write.blocking = True
        FileSystemWriterAsync.write_preloaded_data = staticmethod(blocking_write)
    return _save(self, sharded_state_dict, staging_dir, finalize)
checkpoint_writer.CheckpointWriter.save = _save_with_blocking_writer
"""


def blocking_checkpoint_env(hook_dir: Path, block_at: str, during: str = "rename") -> tuple[dict, Path]:
    """The environment of a run whose checkpoint `block_at` (a directory name, or "any") blocks
    `during` its "rename" or its "write", and the marker file that appears when it does."""
    import os

    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_BLOCK_HOOK)
    marker = hook_dir / "blocked"
    env = subprocess_env(RIFT_TEST_BLOCK_AT=block_at, RIFT_TEST_BLOCK_DURING=during,
                         RIFT_TEST_BLOCKED_MARKER=str(marker))
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), env["PYTHONPATH"]])
    return env, marker

"""Everything the GPU check runs in another process: the environment each command gets (offline,
caches in the work dir, the checkout importable), `rift ...` commands with their output logged and,
when asked, their GPU use watched, and the probe of versions and CUDA (in a subprocess, so that
the check's own process never creates a CUDA context)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .gpu_watch import GpuReader, GpuWatch

REPO = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def base_env(work: Path) -> dict[str, str]:
    """Offline everywhere (the GPU machine has no network), caches inside the work dir, the
    repository importable without installing it (pyproject says Python <3.12; the GPU image is
    3.12)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HOME=str(work / "hf_home"), PYTHONUNBUFFERED="1")
    return env


def cpu_env(env: Mapping[str, str]) -> dict[str, str]:
    """No visible GPU: the project picks its CPU platform (gloo, local layers, CPU compat)."""
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


def run_logged(cmd: list[str], env: Mapping[str, str], log: Path, timeout: float,
               reader: GpuReader | None = None) -> dict[str, Any]:
    """Run `cmd` (its own process group, output to `log`); with a reader, watch its GPU use."""
    say(f"$ {shlex.join(cmd[2:] if cmd[:2] == [sys.executable, '-m'] else cmd)}")
    watch = GpuWatch(reader) if reader is not None else None
    started = time.perf_counter()
    timed_out = False
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, env=dict(env), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if watch is not None:
            watch.attach(proc.pid)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, helpers included
            returncode, timed_out = proc.wait(), True
    result = {"command": shlex.join(cmd), "returncode": returncode, "timed_out": timed_out,
              "seconds": round(time.perf_counter() - started, 2), "gpu": watch.stop() if watch else None}
    say(f"  exit {returncode}{' (timed out)' if timed_out else ''} after {result['seconds']} s; log {log.name}")
    if returncode != 0:
        result["log_tail"] = tail(log)
    return result


def python_json(code: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, "-c", code], env=dict(env), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


PROBE = """
import importlib.metadata as md, importlib.util, json, platform, sys, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": cuda, "device_count": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
        "transformer_engine_importable": importlib.util.find_spec("transformer_engine") is not None,
        "vllm_importable": importlib.util.find_spec("vllm") is not None,
        "packages": {n: version(n) for n in ("megatron-core", "transformers", "datasets", "pyarrow", "safetensors",
                                              "huggingface-hub", "nvidia-ml-py", "numpy")}}
print(json.dumps(info))
"""


def probe_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """Versions and CUDA, read in a subprocess so this process never creates a CUDA context (the
    conversions' GPU check must see only their own processes)."""
    info = python_json(PROBE, env)
    info["cpu_count"] = os.cpu_count()
    info["layer_impl_key"] = layer_impl_supported()
    info["git_commit"] = _git("rev-parse", "HEAD")
    return info


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def layer_impl_supported() -> bool:
    """Whether this checkout's config has `model.layer_impl` accepting `local` (added 2026-12;
    older checkouts lack it): without it a CUDA run asks for Transformer Engine layers."""
    from dataclasses import fields

    from rift_megatron.config.schema import ModelConfig

    return any(f.name == "layer_impl" and "local" in str(f.type) for f in fields(ModelConfig))

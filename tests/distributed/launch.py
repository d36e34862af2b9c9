"""Launch a worker script under torchrun (real processes, gloo) from a pytest test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_torchrun(script: Path, nproc: int, spec: dict, work_dir: Path, timeout: float = 600) -> None:
    """Run `script --spec <json>` on `nproc` local processes; raise with the output on failure."""
    spec_path = work_dir / f"spec-{nproc}-{len(list(work_dir.glob('spec-*')))}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
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

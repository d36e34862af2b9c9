"""The one environment every test subprocess runs in.

The repository first on PYTHONPATH; no model hub (HF offline); one torch / OpenMP thread, set rather
than inherited, so a result never depends on the machine's core count or the caller's shell; and no
torchrun / Slurm variables from the caller (a child that inherited them would join the caller's
rendezvous). `extra` adds or replaces variables.
"""

from __future__ import annotations

import os
from pathlib import Path

from rift_megatron.parallel import standalone_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = standalone_environment()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env

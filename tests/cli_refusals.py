"""The real `rift` CLI refusing bad input: run it in a subprocess, assert the one-line refusal.

What every refusal promises (README, "What is refused"): exit code 2, exactly one non-empty line
on stderr, `rift <command>: error: ...`, naming what to fix (a file and line, a flag, a config key,
a tensor); no traceback and no library warnings around it. Shared by the refusal tests of every
command, so that promise is written down once.
"""

from __future__ import annotations

import subprocess
import sys

from tests.environment import REPO_ROOT, subprocess_env


def run_rift(*argv: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m rift_megatron.cli ARGV...` in the tests' environment (plus `env`)."""
    return subprocess.run(
        [sys.executable, "-m", "rift_megatron.cli", *argv],
        env=subprocess_env(**env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def assert_refused(result: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """Exit 2 and one stderr line `rift COMMAND: error: ...` holding every fragment; returns it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr[-4000:]}"
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{result.stderr[-4000:]}"
    line = lines[0]
    assert line.startswith(f"rift {command}: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line

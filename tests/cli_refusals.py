"""The real `rift` CLI refusing bad input: run it in its own process, assert the one-line refusal.

What every refusal promises (README, "What is refused"): exit code 2, exactly one non-empty line
on stderr, `rift <command>: error: ...`, naming what to fix (a file and line, a flag, a config key,
a tensor); no traceback and no library warnings around it. Shared by the refusal tests of every
command, so that promise is written down once.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys

from tests.environment import REPO_ROOT, subprocess_env


class _CliServer:
    """One tests/cli_zygote.py process for the whole session, started on first use."""

    process: subprocess.Popen | None = None

    @classmethod
    def run(cls, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        if cls.process is None or cls.process.poll() is not None:
            cls.process = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "tests" / "cli_zygote.py")], env=subprocess_env(), cwd=REPO_ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(cls.process.kill)
            ready = cls.process.stdout.readline()
            assert ready.strip() == "ready", f"tests/cli_zygote.py did not start (it printed {ready!r})"
        request = {"argv": list(argv), "env": env, "cwd": str(REPO_ROOT), "timeout": timeout}
        cls.process.stdin.write(json.dumps(request) + "\n")
        cls.process.stdin.flush()
        reply = json.loads(cls.process.stdout.readline())
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(["rift", *argv], timeout)
        return subprocess.CompletedProcess(["rift", *argv], reply["returncode"], reply["stdout"], reply["stderr"])


def run_rift(*argv: str, timeout: float = 300, fresh: bool = False, **env: str) -> subprocess.CompletedProcess:
    """`python -m rift_megatron.cli ARGV...` in the tests' environment (plus `env`).

    By default the command runs in a fork of tests/cli_zygote.py, which has imported the CLI once
    (a fresh interpreter costs seconds of imports per command); `fresh=True` starts a real
    interpreter, which also shows what importing prints."""
    if not fresh:
        return _CliServer.run(list(argv), subprocess_env(**env), timeout)
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

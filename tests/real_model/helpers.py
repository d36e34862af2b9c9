"""Subprocess helpers of the real-model tier: the `rift` CLI as a user runs it, and probe scripts.

Heavy work (Megatron, vLLM, loading the 135M model in `transformers`) never runs in the pytest
process: each command or probe is its own Python process, as in the other CLI tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.rollout_fixtures import REPO_ROOT, arithmetic_prompts, subprocess_env, write_jsonl

__all__ = ["addition_prompts", "describe", "rift", "run_probe", "write_jsonl"]


def rift(*argv: str, timeout: float = 900, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m rift_megatron.cli ARGV...``; return the result and its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "rift_megatron.cli", *argv],
        env=subprocess_env(**env), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )
    return result, time.perf_counter() - started


def describe(result: subprocess.CompletedProcess) -> str:
    """The tail of a command's output, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"


def run_probe(code: str, args: dict, timeout: float = 600) -> dict:
    """Run ``code`` (which reads ``ARGS`` and assigns a JSON-able dict to ``RESULT``) in a subprocess."""
    script = (
        "import json, sys\n"
        "ARGS = json.loads(sys.argv[1])\n"
        f"{code}\n"
        "print('@@RESULT@@' + json.dumps(RESULT))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)],
        env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"probe failed: {describe(result)}"
    line = [item for item in result.stdout.splitlines() if item.startswith("@@RESULT@@")]
    assert line, f"probe printed no result: {describe(result)}"
    return json.loads(line[-1][len("@@RESULT@@"):])


def addition_prompts(count: int, seed: int = 12) -> list[dict[str, str]]:
    """Prompt records {"prompt", "answer"}: two two-digit numbers to add, answer asked in ``\\boxed{}``
    (the math reward's first choice)."""
    return arithmetic_prompts(count, seed, low=10, template="What is {a} + {b}? Put the final answer in \\boxed{{}}.")

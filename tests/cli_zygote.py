"""A `rift` CLI server for the refusal tests: imports once, then runs each command in a fork.

Why: a refusal test's own work takes milliseconds, but a fresh `python -m rift_megatron.cli`
spends 3-6 CPU seconds importing torch, Megatron-Core and transformers first, and the suite runs
about a hundred of them. This process imports what the CLI imports before it can refuse anything,
once, and answers each request (one JSON line on stdin: argv, env, cwd, timeout) by forking: the
child gets the request's environment, working directory and a fresh stdout/stderr (files), runs
`rift_megatron.cli.main(argv)` exactly as `python -m rift_megatron.cli` would, and exits with its
return code. The parent replies with one JSON line: the exit code, stdout and stderr.

What a fresh process checks and a fork cannot: warnings printed while importing. So the server
refuses to start when its own imports printed anything on stderr (that would be such a warning),
and tests/unit/test_input_refusals.py keeps running the CLI as a real subprocess
(`run_rift(..., fresh=True)`) for one case of each command.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time

PRELOADED = (
    "rift_megatron.cli", "rift_megatron.config", "rift_megatron.training.loop", "rift_megatron.rollout.cli",
    "rift_megatron.rollout.eval_cli", "rift_megatron.convert.cli", "transformers",
)


def _preload() -> None:
    """Import what the CLI imports before it refuses; fail loudly if that printed anything."""
    import importlib

    captured = tempfile.TemporaryFile(mode="w+")
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
        for name in PRELOADED:
            importlib.import_module(name)
        sys.stderr.flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    captured.seek(0)
    noise = captured.read().strip()
    if noise:
        raise SystemExit(f"cli_zygote: importing the CLI printed on stderr (a fresh process would too):\n{noise}")


def _child(request: dict, out_path: str, err_path: str) -> None:
    """In the fork: become a fresh `python -m rift_megatron.cli ARGV` process, then exit the way
    the interpreter does (SystemExit: exit handlers run and threads are joined)."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["rift", *request["argv"]]
        from rift_megatron.cli import main

        try:
            code = main(request["argv"])
        except SystemExit as stop:  # argparse errors and explicit exits, as the interpreter would map them
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
    except BaseException:  # an uncaught error: a traceback and exit 1, as the interpreter prints it
        import traceback

        traceback.print_exc()
        code = 1
    raise SystemExit(code if isinstance(code, int) else 1)


def _run(request: dict) -> dict:
    with tempfile.NamedTemporaryFile(delete=False) as out, tempfile.NamedTemporaryFile(delete=False) as err:
        paths = (out.name, err.name)
    parent = os.getpid()
    try:
        pid = os.fork()
        if pid == 0:
            _child(request, *paths)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return {"timeout": True}
            time.sleep(0.02)
        returncode = os.waitstatus_to_exitcode(status)
        texts = [io.open(path, encoding="utf-8", errors="replace").read() for path in paths]
        return {"returncode": returncode, "stdout": texts[0], "stderr": texts[1]}
    finally:
        if os.getpid() == parent:  # the child leaves the files to the parent
            for path in paths:
                os.unlink(path)


def main() -> None:
    _preload()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    print("ready", file=replies)
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), file=replies)


if __name__ == "__main__":
    main()

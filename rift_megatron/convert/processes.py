"""Run conversion work in several spawned processes, failing as one line (`--nproc N`).

Both directions split their work by bytes (`split_by_size`) and hand each share to a process
(`run_in_processes`). Not `torch.multiprocessing.start_processes`: on a failure it logs a line for
every process it terminates and re-raises the child's traceback, neither of which may reach the
CLI's one-line error.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from rift_megatron.convert.errors import ConversionError
from rift_megatron.exits import first_line
from rift_megatron.parallel import standalone_environment

T = TypeVar("T")


def split_by_size(items: Sequence[T], sizes: Sequence[int], parts: int) -> list[list[T]]:
    """Largest-first greedy split of `items` into `parts` lists of about equal total size, so
    the processes given them finish together; each list is in the order items were assigned."""
    shares: list[list[T]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for index in sorted(range(len(items)), key=lambda i: -sizes[i]):
        part = loads.index(min(loads))
        shares[part].append(items[index])
        loads[part] += sizes[index]
    return shares


def _run_job(worker: Callable[..., Any], job: tuple, outcome: str) -> None:
    """Body of one spawned process: run the job, leave [kind, payload] in `outcome` (JSON), exit.

    The process starts without the parent's launcher variables (under torchrun it would join the
    parent's group); a job that needs a group of its own sets them itself. Nothing is printed: a
    ConversionError becomes its one-line message (exit 2), anything else its type and first line
    (exit 1), so the CLI reports one line however many processes failed.
    """
    environment = standalone_environment()
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(1)  # nproc workers on nproc cores: one thread each, no oversubscription
    try:
        result, code = ["ok", worker(*job)], 0
    except ConversionError as error:
        result, code = ["error", str(error)], 2
    except BaseException as error:  # noqa: BLE001 - reported by the parent as one line
        result, code = ["crash", f"{type(error).__name__}: {_first_line(error)}"], 1
    partial = f"{outcome}.partial"
    with open(partial, "w") as handle:
        json.dump(result, handle)
    os.replace(partial, outcome)  # the parent never reads half a result
    sys.exit(code)


def _first_line(error: BaseException) -> str:
    return first_line(error) or repr(error)


def run_in_processes(worker: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]:
    """`[worker(*job) for job in jobs]`, each job in its own spawned process, results in job order.

    `worker` must be a module-level function (spawn pickles it by name), its jobs picklable and
    its results JSON-serialisable. If any process fails, the others are stopped at once (a
    failure early in a long conversion must not wait for the rest) and one ConversionError is
    raised: a worker's own ConversionError message if there is one, else the first line of what
    went wrong. The caller cleans up what the workers wrote (into its staging directory).
    Results come back in files rather than a queue: a process stopped while it writes to a queue
    can leave the queue unreadable.
    """
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rift-convert-") as results:
        outcomes = [os.path.join(results, f"job{index}.json") for index in range(len(jobs))]
        processes = [
            context.Process(target=_run_job, args=(worker, job, outcome), name=f"rift-convert-{index}")
            for index, (job, outcome) in enumerate(zip(jobs, outcomes))
        ]
        try:
            for process in processes:
                process.start()
            running = {process.sentinel: process for process in processes}
            while running:
                for sentinel in multiprocessing.connection.wait(list(running)):
                    process = running.pop(sentinel)
                    process.join()
                    if process.exitcode != 0:
                        running = {}
                        break
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join()
        results_by_job = [_read_outcome(path) for path in outcomes]
    failures = [(index, kind, payload) for index, (kind, payload) in enumerate(results_by_job) if kind != "ok"]
    if not failures:
        return [payload for _, payload in results_by_job]
    for wanted in ("error", "crash"):
        for index, kind, payload in failures:
            if kind == wanted:
                raise ConversionError(payload if kind == "error" else f"conversion process {index} failed: {payload}")
    index = failures[0][0]
    raise ConversionError(
        f"conversion process {index} died with exit code {processes[index].exitcode} and no report "
        "(killed from outside, e.g. by the out-of-memory killer?)"
    )


def _read_outcome(path: str) -> tuple[str, Any]:
    """A job's (kind, payload); ("missing", None) for a process that ended without one."""
    try:
        with open(path) as handle:
            kind, payload = json.load(handle)
    except FileNotFoundError:
        return "missing", None
    return kind, payload

"""A pool of worker processes that score samples with a per-sample wall-clock limit.

Model text is untrusted: a tower exponent or a deeply nested expression can keep SymPy busy for
minutes, and math-verify's own timeout (``signal.alarm``) only works in a process's main thread.
So each sample is sent to a worker *process* (``spawn`` start method: nothing of the trainer's
state, threads or CUDA context is inherited); the parent waits for its answer with a deadline and,
when the deadline passes, kills the worker (SIGKILL), scores the sample ``r_neg`` with
``timed_out=True`` and starts a replacement. A worker that dies (crash, memory cap) costs only
its current sample. Workers start once per pool (about a second: Python + SymPy + math-verify)
and are reused across batches; the time limit counts from the moment a sample is handed to a
ready worker, so start-up is never charged to a sample.

Usage::

    with VerifierPool(RewardSpec(kind="math", timeout_s=5.0, workers=2)) as pool:
        results = pool.score_all([(prompt, response, answer), ...])   # list[RewardResult]
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from .errors import RolloutFailure
from .rewards import _FUNCTION_CACHE, RewardResult, RewardSpec, load_reward_function, score_sample

logger = logging.getLogger(__name__)

#: A worker that has not reported ready after this long is considered broken.
STARTUP_TIMEOUT_S = 120.0
#: Consecutive worker start failures after which the pool gives up.
MAX_START_FAILURES = 3


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the parent dies, even mid-computation."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _worker_main(conn: Connection, spec: RewardSpec, parent_pid: int) -> None:
    """Worker loop: receive ``(index, prompt, response, answer)``, send back ``(index, result tuple)``;
    ``None`` (or a closed pipe) ends it. Scoring never raises (see :func:`score_sample`)."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business; it closes us
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings: we time out
    if spec.memory_limit_mb is not None:
        try:
            import resource

            limit = spec.memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    if spec.kind == "function":  # import the user's function (never call it on a dummy sample)
        _FUNCTION_CACHE[spec.function] = load_reward_function(spec.function)
    else:  # warm up: SymPy / math-verify imports, regex compilation
        score_sample(spec, "", "\\boxed{1}", "1")
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, prompt, response, answer = message
        result = score_sample(spec, prompt, response, answer)
        try:
            conn.send(("result", index, result.reward, result.correct, result.error))
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, process, conn: Connection):
        self.process = process
        self.conn = conn
        self.ready = False
        self.started = time.monotonic()
        self.index: int | None = None  # sample being scored
        self.deadline = 0.0


class VerifierPool:
    """Worker processes scoring ``(prompt, response, answer)`` triples under ``spec.timeout_s`` each.

    Use as a context manager (or call :meth:`close`). :meth:`score_all` returns one
    :class:`RewardResult` per item, in order; it never raises for a bad sample. Counters
    ``timeouts`` / ``restarts`` accumulate over the pool's life.
    """

    def __init__(self, spec: RewardSpec | None = None, *, start_method: str = "spawn"):
        self.spec = spec if spec is not None else RewardSpec()
        self._ctx = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self.timeouts = 0
        self.restarts = 0
        self._closed = False
        for _ in range(self.spec.workers):
            self._workers.append(self._start_worker())

    # -- lifecycle -----------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.spec, os.getpid()), name="rift-verifier", daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _stop_worker(self, worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop_worker(worker)
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.restarts += 1

    def close(self) -> None:
        """Stop all workers (politely, then by force). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                if worker.index is None:
                    worker.conn.send(None)
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 2.0
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, end - time.monotonic()))
            self._stop_worker(worker)
        self._workers = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- scoring -------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has started (optional: :meth:`score_all` does not need it)."""
        end = time.monotonic() + timeout
        while not all(w.ready for w in self._workers):
            self._poll([w for w in self._workers if not w.ready], max(0.0, min(1.0, end - time.monotonic())), None)
            if time.monotonic() > end:
                raise RuntimeError(f"reward verifier workers did not start within {timeout:.0f} s")

    def score_all(self, items: Sequence[tuple[str, str, str]]) -> list[RewardResult]:
        """Score ``(prompt, response, answer)`` triples; a sample that exceeds ``spec.timeout_s``
        scores ``r_neg`` with ``timed_out=True`` and its worker is replaced."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        spec = self.spec
        results: list[RewardResult | None] = [None] * len(items)
        pending = collections.deque(range(len(items)))
        send_failures: collections.Counter[int] = collections.Counter()
        while pending or any(w.index is not None for w in self._workers):
            for worker in list(self._workers):
                if pending and worker.ready and worker.index is None:
                    index = pending.popleft()
                    prompt, response, answer = items[index]
                    try:
                        worker.conn.send((index, prompt, response, answer))
                    except (OSError, ValueError) as exc:  # worker died while idle; retry the sample once
                        send_failures[index] += 1
                        if send_failures[index] >= 2:
                            results[index] = RewardResult(spec.r_neg, False, error=f"could not send sample to a verifier worker: {exc}")
                        else:
                            pending.appendleft(index)
                        self._replace(worker)
                        continue
                    worker.index, worker.deadline = index, time.monotonic() + spec.timeout_s
            busy = [w.deadline for w in self._workers if w.index is not None]
            timeout = max(0.0, min(busy) - time.monotonic()) if busy else 1.0
            self._poll(self._workers, timeout, results)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.index is not None and now >= worker.deadline:
                    results[worker.index] = RewardResult(
                        spec.r_neg, False, timed_out=True,
                        error=f"verification exceeded {spec.timeout_s:g} s; worker restarted",
                    )
                    self.timeouts += 1
                    self._replace(worker)
        final = [r if r is not None else RewardResult(spec.r_neg, False, error="not scored") for r in results]
        problems = [r for r in final if r.timed_out or r.error]
        if problems:
            logger.warning(
                "rewards: %d of %d samples timed out or failed (first: %s)",
                len(problems), len(final), problems[0].error,
            )
        return final

    def _poll(self, workers: list[_Worker], timeout: float, results: list | None) -> None:
        """Wait up to ``timeout`` for messages from ``workers`` and handle them."""
        by_conn = {w.conn: w for w in workers}
        for conn in wait(list(by_conn), timeout=timeout):
            worker = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._worker_died(worker, results)
                continue
            if message[0] == "ready":
                worker.ready = True
                self._start_failures = 0
            elif message[0] == "result" and results is not None and message[1] == worker.index:
                _, index, reward, correct, error = message
                results[index] = RewardResult(reward, correct, False, error)
                worker.index = None
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.ready and now - worker.started > STARTUP_TIMEOUT_S:
                self._worker_died(worker, results, reason=f"did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _worker_died(self, worker: _Worker, results: list | None, reason: str | None = None) -> None:
        worker.process.join(timeout=5)
        reason = reason or f"exit code {worker.process.exitcode}"
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self.close()
                raise RolloutFailure(
                    f"reward verifier workers keep failing to start ({reason}); spec={self.spec!r}. "
                    "Check that math-verify is installed, that a reward function's module imports in a fresh "
                    "process, and that a script creating the pool guards it with `if __name__ == \"__main__\":` "
                    "(workers use the spawn start method, which re-imports the main module)."
                )
        if worker.index is not None and results is not None:
            results[worker.index] = RewardResult(self.spec.r_neg, False, error=f"verifier worker died ({reason})")
            worker.index = None
        self._replace(worker)

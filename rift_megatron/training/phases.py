"""Name the phase a collective failed in: a gloo / NCCL timeout or a lost peer otherwise surfaces
as a library RuntimeError naming a C++ source file, not the rank, the phase or the setting to change.

The training loop runs each phase (rollout, training step, weight push, evaluation, checkpoint) in
:func:`phase`; a collective failure inside it becomes :class:`CollectiveFailure`, one line. (On
GPUs NCCL's watchdog may abort the process before Python sees an error; its own log then names
the collective, and `parallel.collective_timeout_minutes` is the timeout it applies.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from rift_megatron.exits import first_line
from rift_megatron.training.errors import CollectiveFailure

# What gloo and NCCL put in the RuntimeErrors they raise (torch.distributed.DistError subclasses
# are recognised by type).
_MARKERS = ("gloo", "nccl", "timed out", "connection closed by peer", "connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error).lower() for marker in _MARKERS)


@contextmanager
def phase(name: str, timeout_key: str) -> Iterator[None]:
    """Run a phase; a collective failure in it becomes one line naming rank, phase and `timeout_key`."""
    try:
        yield
    except RuntimeError as error:
        if not is_collective_failure(error):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveFailure(
            f"rank {rank}: a collective failed during the {name} ({first_line(error) or type(error).__name__}); if the other ranks were only slow, "
            f"raise {timeout_key}, otherwise the first rank to fail says why") from None


def in_phase(name: str, timeout_key: str = "parallel.collective_timeout_minutes"):
    """Decorator form of :func:`phase` for the training loop's methods."""
    def decorate(method):
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            with phase(name, timeout_key):
                return method(*args, **kwargs)
        return wrapped
    return decorate

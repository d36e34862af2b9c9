"""SIGTERM / SIGINT turned into "save at the next safe point, then stop" (Megatron-LM's
`--exit-signal-handler`, which Slurm pre-emption relies on).

A signal only sets a flag; the training loop asks :meth:`StopRequest.agreed` at its safe points
(after an optimizer step offline, after an iteration online: where a checkpoint holds the whole
loop state). The flag is reduced over the world, so every rank stops at the same step even when
the signal reached only some of them (Slurm signals every task, a terminal's Ctrl-C only the
local node). A second Ctrl-C means "now": it raises KeyboardInterrupt at once, without saving.
"""

from __future__ import annotations

import signal
import threading

import torch

from rift_megatron.parallel import all_reduce_max
from rift_megatron.platform import current_platform

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers on entry (main thread only) and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, do not wait for the safe point
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next safe point, then stopping "
              f"(press Ctrl-C again to stop now without saving)", flush=True)

    def agreed(self) -> int | None:
        """The signal number if any rank was signalled (the same answer on every rank), else None."""
        flag = torch.tensor([float(self.signum or 0)], device=current_platform().device())
        all_reduce_max(flag)
        return int(flag.item()) or None

"""Ways a training run stops on purpose, in a module free of torch so the CLI can catch them
without importing it. Each carries the one line the user sees and the exit code."""

from __future__ import annotations

import signal


class TrainingStopped(RuntimeError):
    """The run stopped at a safe point; `str(self)` says why and what was kept."""

    exit_code = 1


class NonFiniteTrainingError(TrainingStopped):
    """`training.max_consecutive_nonfinite` optimizer steps in a row had non-finite gradients:
    they were skipped (weights unchanged), and continuing would skip forever or hide a bad input."""


class TrainingInterrupted(TrainingStopped):
    """SIGTERM (e.g. Slurm pre-emption) or SIGINT (Ctrl-C) arrived: the run saved a checkpoint at
    the next safe point and stops; the exit code is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum

    @staticmethod
    def signal_name(signum: int) -> str:
        return signal.Signals(signum).name


class CollectiveFailure(TrainingStopped):
    """A collective timed out or lost a peer: the message names this rank, the phase it was in
    and the config key of the timeout (another rank's own error says why it stopped)."""


# What a training run's second Ctrl-C (KeyboardInterrupt) prints, from `rift train` or torchrun.
INTERRUPTED_WITHOUT_SAVING = ("interrupted (second Ctrl-C): stopped without saving; the last complete checkpoint "
                              "is intact (a checkpoint being written never becomes `latest`)")

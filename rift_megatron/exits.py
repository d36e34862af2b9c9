"""How every entry point (`rift ...`, `torchrun -m rift_megatron.train`) turns an expected failure
into one line on stderr and an exit code: the one table of them.

    2        bad input: a file, field, flag or checkpoint refused (ValueError and friends)
    1        the run stopped on purpose: a failed weight-sync check, a dead rollout component,
             non-finite steps, a failed collective
    128 + n  stopped by signal n after saving (SIGTERM 143, SIGINT 130); 130 for a second Ctrl-C
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rift_megatron.rollout.errors import RolloutFailure, WeightSyncError
from rift_megatron.staging import OutputExistsError
from rift_megatron.training.errors import INTERRUPTED_WITHOUT_SAVING, TrainingStopped

# Bad input (files, fields, flag values): ConversionError, ConfigError, ModelConfigError,
# PromptFileError and UntrustedCheckpointError are ValueError subclasses.
USER_ERRORS = (ValueError, FileNotFoundError, OutputExistsError)


def run_reporting(command: str, body: Callable[[], int]) -> int:
    """`body()`'s exit code, or the one-line report and exit code of an expected failure."""
    try:
        return body()
    except USER_ERRORS as error:
        _say(command, f"error: {error}")
        return 2
    except (WeightSyncError, RolloutFailure) as error:  # every rank stops here, before the weights moved
        _say(command, f"error: {error}")
        return 1
    except TrainingStopped as error:  # a signal, non-finite steps or a failed collective: a safe point
        _say(command, str(error))
        return error.exit_code
    except KeyboardInterrupt:
        # Outputs are staged and renamed into place only when complete, so nothing half-written is
        # left; a training run keeps its last checkpoint (its first Ctrl-C saves one).
        _say(command, INTERRUPTED_WITHOUT_SAVING if command == "train"
             else "interrupted: stopped without writing partial output")
        return 130


def first_line(error: BaseException) -> str:
    """The first line of an error's message ("" if it has none): what a one-line report quotes of
    a library's multi-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _say(command: str, text: str) -> None:
    print(f"rift {command}: {text}", file=sys.stderr, flush=True)

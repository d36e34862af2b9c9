"""Atomic output directories: write into a hidden sibling, rename into place when complete.

A crash or an error mid-write leaves the destination as it was (absent, or the previous
complete version), never a half-written directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The destination exists and is not empty, and overwriting was not asked for."""


def check_writable(destination: Path, overwrite: bool) -> None:
    """Refuse a non-empty destination unless `overwrite` (cheap: call before long work)."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise OutputExistsError(f"{destination}: output directory exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory that becomes `destination` when the block succeeds."""
    destination = Path(destination)
    check_writable(destination, overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, destination)


def replace_directory(staging: Path, destination: Path) -> None:
    """Move a complete `staging` directory to `destination`, replacing what was there."""
    previous = destination.with_name(f".{destination.name}.previous-{os.getpid()}")
    if destination.exists():
        destination.rename(previous)
    staging.rename(destination)
    shutil.rmtree(previous, ignore_errors=True)

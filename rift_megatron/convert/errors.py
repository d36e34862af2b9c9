"""Errors of the checkpoint converter."""

from __future__ import annotations


class ConversionError(ValueError):
    """A user-facing conversion problem (bad checkpoint, missing file, unsupported dtype...).

    Raised instead of KeyError/OSError/json errors so the CLI can print one clear line; the
    message always names the file, tensor or field at fault so the user knows what to fix.
    """

"""The error a refused checkpoint file raises (torch-free, so every CLI can catch it cheaply)."""

from __future__ import annotations


class UntrustedCheckpointError(ValueError):
    """A checkpoint file that must not be used: it holds something other than data (a pickled
    global outside the allow-list), or its bytes differ from the ones recorded when it was
    written. The message is one line naming the file and what is wrong with it; the CLIs print
    it and exit 2 (a ValueError, like every other bad-input error)."""

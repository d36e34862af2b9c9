"""Checkpoint files are data, never code, and are the bytes that were written.

`unpickle`: what may be unpickled from a checkpoint (DCP metadata through an allow-list, every
torch-saved part with `weights_only=True`); `checksums`: the sha256 of every file of a
checkpoint, written last and checked before use; `admission`: the one door every load goes
through (both checks, then Megatron's loader with the restricted readers in place).
"""

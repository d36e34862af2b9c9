"""Library warnings that are expected where they appear and only bury the result: filtered by message.

Each entry is one specific message with the reason it is expected; anything else (another
warning, any error) still reaches the user. Installed by `current_platform()` on a CPU machine
and by the conversion package on import (`rift convert` is CPU work on every machine, and its
spawned writers and verify's torchrun workers import that package before Megatron, so the
filters are in place before Megatron's import-time warnings fire).
"""

from __future__ import annotations

import warnings

__all__ = ["EXPECTED_WARNINGS", "silence_expected_warnings"]

# (regex matched against the start of the message, category, why it is expected)
EXPECTED_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning,
     "Megatron-Core falls back to its local kernels and torch optimizers: the design on the CPU and in "
     "conversion, which runs no kernels; on a GPU, `model.layer_impl` reports the choice itself"),
    ("Apex is not installed", UserWarning, "the same fallback, warned by other Megatron modules"),
    ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to (load|save) in a "
     "single process", UserWarning,
     "conversion reads and writes checkpoints in one process on purpose (`no_dist=True`)"),
    ("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
     FutureWarning,
     "Megatron-Core's torch_dist strategy loads every checkpoint (initial weights, resume) through DCP's "
     "`load_state_dict`; ours to change only by changing Megatron"),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "Megatron-Core's distributed checkpoints are ShardedTensors by design; DCP's load planner says so "
     "for every load"),
)


def silence_expected_warnings() -> None:
    """Filter the warnings of EXPECTED_WARNINGS in this process (idempotent)."""
    for message, category, _why in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

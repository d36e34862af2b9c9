"""The minimal Megatron world conversion needs: a process group and TP1/PP1 parallel state.

Conversion asks a TP1 model (built on the meta device) for its checkpoint layout, and reads
checkpoints through Megatron's loader; both need Megatron's parallel state. Conversion runs as a
CLI process, as spawned workers, or inside a caller that already set Megatron up.

Conversion is CPU work on every machine: the world it creates is a gloo group with no GPU bound
and no CUDA RNG seeded, so on a GPU node it creates no CUDA context and uses no GPU memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel


@contextmanager
def tp1_megatron_world() -> Iterator[None]:
    """Ensure a TP1/PP1 Megatron world for the block; tear down only what this call created."""
    from megatron.core import parallel_state as ps

    init_distributed(cpu_only=True)
    created = not ps.model_parallel_is_initialized()
    if created:
        init_model_parallel(ParallelLayout(), seed=None)
    elif ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("checkpoint conversion needs Megatron parallel state with TP1/PP1 (or none at all)")
    try:
        yield
    finally:
        if created:
            destroy_model_parallel()

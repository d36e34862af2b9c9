"""Everything that differs between a CUDA machine and a CPU-only machine lives in this package.

The rest of the code asks `current_platform()` for the device and the process-group backend, and
`resolve_layer_impl()` for the transformer layer implementation, and never checks for CUDA itself.
"""

from rift_megatron.platform.device import (
    LAYER_IMPL_CHOICES,
    LayerImplError,
    Platform,
    current_platform,
    resolve_layer_impl,
)

__all__ = ["LAYER_IMPL_CHOICES", "LayerImplError", "Platform", "current_platform", "resolve_layer_impl"]

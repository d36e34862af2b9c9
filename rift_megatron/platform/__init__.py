"""Everything that differs between a CUDA machine and a CPU-only machine lives in this package.

The rest of the code asks `current_platform()` for the device, the process-group backend and the
transformer layer implementation, and never checks for CUDA itself.
"""

from rift_megatron.platform.device import Platform, current_platform

__all__ = ["Platform", "current_platform"]

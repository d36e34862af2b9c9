"""Device, backend and layer-implementation choice.

One decision, made once per process: with CUDA present we train on GPUs with NCCL and Transformer
Engine layers; without it we train on the CPU with gloo and Megatron-Core's local layers, after
applying the CPU compatibility layer (`cpu_compat`). Nothing else in the package branches on
`torch.cuda.is_available()`.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Platform:
    """The hardware facts the rest of the code needs."""

    kind: Literal["cuda", "cpu"]
    backend: Literal["nccl", "gloo"]
    layer_impl: Literal["transformer_engine", "local"]

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def device(self) -> torch.device:
        """The device of this process: its local GPU (LOCAL_RANK) or the CPU."""
        if self.is_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def bind_local_device(self) -> None:
        """Pin this process to its GPU (torchrun's LOCAL_RANK); nothing to do on the CPU."""
        if self.is_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def detect_platform() -> Platform:
    """Pure detection, no side effects: CUDA + NCCL + TE if a GPU is visible, else CPU + gloo."""
    if torch.cuda.is_available():
        return Platform(kind="cuda", backend="nccl", layer_impl="transformer_engine")
    return Platform(kind="cpu", backend="gloo", layer_impl="local")


@functools.cache
def current_platform() -> Platform:
    """Detect the platform and, on a CUDA-less machine, make Megatron-Core runnable on the CPU.

    Cached: the compatibility layer is applied at most once per process, and never when CUDA is
    present (`cpu_compat.apply_cpu_compat` refuses to run there).
    """
    platform = detect_platform()
    if not platform.is_cuda:
        from rift_megatron.platform.cpu_compat import apply_cpu_compat

        # Megatron-Core warns at import that it falls back to its local kernels without TE / apex:
        # on the CPU that fallback is the design, so the warning would only bury real messages.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)

        apply_cpu_compat()
    return platform

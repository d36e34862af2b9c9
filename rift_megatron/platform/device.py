"""Device, backend and layer-implementation choice.

One decision, made once per process: with CUDA present we train on this process's GPU with NCCL;
without it we train on the CPU with gloo, after applying the CPU compatibility layer
(`cpu_compat`). Nothing else in the package branches on `torch.cuda.is_available()`, and every
tensor the trainer hands to the model or to a collective is placed with `Platform.device()` /
`Platform.to_device()` (the way Megatron-LM's `get_batch` moves a batch once, on arrival).

The transformer layer implementation is a second, separate choice (`model.layer_impl`):
Transformer Engine's fused layers where TE is importable on a CUDA machine, Megatron-Core's local
(pure PyTorch) layers otherwise. A stock CUDA PyTorch without TE is common, and must run.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

LayerImpl = Literal["transformer_engine", "local"]
LAYER_IMPL_CHOICES = ("auto", "transformer_engine", "local")


class LayerImplError(ValueError):
    """A `model.layer_impl` this machine cannot provide."""


@dataclass(frozen=True)
class Platform:
    """The hardware facts the rest of the code needs."""

    kind: Literal["cuda", "cpu"]
    backend: Literal["nccl", "gloo"]

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def device(self) -> torch.device:
        """The device of this process: its local GPU (bound from LOCAL_RANK) or the CPU."""
        if self.is_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch (dict of tensors) on this process's device: moved once, where it enters the
        trainer, so nothing downstream has to think about placement."""
        device = self.device()
        return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}

    def bind_local_device(self) -> None:
        """Pin this process to its GPU (torchrun's LOCAL_RANK); nothing to do on the CPU."""
        if self.is_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def detect_platform() -> Platform:
    """Pure detection, no side effects: CUDA + NCCL if a GPU is visible, else CPU + gloo."""
    if torch.cuda.is_available():
        return Platform(kind="cuda", backend="nccl")
    return Platform(kind="cpu", backend="gloo")


@functools.cache
def current_platform() -> Platform:
    """Detect the platform and, on a CUDA-less machine, make Megatron-Core runnable on the CPU.

    Cached: the compatibility layer is applied at most once per process, and never when CUDA is
    present (`cpu_compat.apply_cpu_compat` refuses to run there).
    """
    platform = detect_platform()
    if not platform.is_cuda:
        from rift_megatron.platform.cpu_compat import apply_cpu_compat
        from rift_megatron.platform.expected_warnings import silence_expected_warnings

        # Megatron-Core warns at import that it falls back to its local kernels without TE / apex:
        # on the CPU that fallback is the design, so the warning would only bury real messages.
        silence_expected_warnings()

        apply_cpu_compat()
    return platform


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch package can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_layer_impl(requested: str = "auto", platform: Platform | None = None) -> LayerImpl:
    """`model.layer_impl` -> the implementation used: 'auto' takes Transformer Engine on a CUDA
    machine where it is importable and the local layers otherwise (with a one-line notice on
    CUDA, where TE's fused kernels are the faster choice). Raises LayerImplError, one line, for
    'transformer_engine' on a machine that cannot run it."""
    platform = platform or current_platform()
    if requested not in LAYER_IMPL_CHOICES:
        raise LayerImplError(f"model.layer_impl must be one of {list(LAYER_IMPL_CHOICES)}, got {requested!r}")
    if requested == "local":
        return "local"
    has_te = platform.is_cuda and transformer_engine_available()
    if requested == "transformer_engine":
        if not platform.is_cuda:
            raise LayerImplError("model.layer_impl 'transformer_engine' needs a CUDA GPU and this machine has none; "
                                 "use 'auto' or 'local'")
        if not has_te:
            raise LayerImplError("model.layer_impl 'transformer_engine' but Transformer Engine is not installed; "
                                 "install the gpu extra (docs/gpu_install.md) or use 'auto' / 'local'")
        return "transformer_engine"
    if platform.is_cuda and not has_te:
        _notice_local_layers_on_cuda()
    return "transformer_engine" if has_te else "local"


@functools.cache
def _notice_local_layers_on_cuda() -> None:
    logger.warning("model.layer_impl=auto: Transformer Engine is not installed, using Megatron-Core's local "
                   "layers on CUDA (correct, slower; install the gpu extra for TE's fused kernels)")

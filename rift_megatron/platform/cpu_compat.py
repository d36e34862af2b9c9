"""Make megatron-core 0.16.1 run on a CUDA-less machine (CPU + gloo).

Megatron-Core assumes CUDA in a handful of places. Each patch below redirects exactly one of
them to the CPU and is applied only when CUDA is absent (`apply_cpu_compat` refuses otherwise),
so the GPU path runs unmodified Megatron-Core. Two rules keep the layer safe:

* Global patches only replace calls that cannot succeed without CUDA (`torch.cuda.current_device`,
  `torch.cuda.synchronize`, `Tensor.cuda`): on this machine they would raise, so giving them the
  meaning "the accelerator is the CPU" changes no behaviour that worked before.
* Patches that change a result which is valid without CUDA (`Tensor.type()` names, the CUDA RNG
  that `torch.cuda.manual_seed` silently ignores on CPU builds, tensor factories called with a
  literal `device="cuda"`) are scoped to Megatron-Core modules only.

`tests/unit/test_platform.py` proves that every patch here is needed (the Megatron call it serves
fails or is silently wrong without it) and that none is applied on a CUDA machine.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_MEGATRON_PREFIX = "megatron.core"

# Megatron modules that call tensor factories with a literal device="cuda" on our code path
# (token counter in the schedules, optimizer/clip-grad scratch, grad scaler, default causal mask).
_DEVICE_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    # fully parallel checkpoint load: buffers for the tensors the data-parallel ranks exchange
    "megatron.core.dist_checkpointing.exchange_utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "empty_like", "zeros_like", "ones_like")


@dataclass(frozen=True)
class Patch:
    """One redirection of a CUDA assumption to the CPU."""

    name: str
    why: str
    apply: Callable[[], None]


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


def _called_from_megatron(depth: int = 2) -> bool:
    """True when the caller `depth` frames up is Megatron-Core code."""
    module = sys._getframe(depth).f_globals.get("__name__", "")
    return module.startswith(_MEGATRON_PREFIX)


class _TorchView(types.ModuleType):
    """What one Megatron module sees as `torch`: the real module with a few names overridden.

    Installed as that module's global `torch`, so the override is invisible to every other module.
    """

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__(real.__name__)
        self.__dict__["_real"] = real

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_real"], name)


def _torch_view_of(module_name: str) -> _TorchView:
    module = importlib.import_module(module_name)
    view = module.__dict__.get("torch")
    if not isinstance(view, _TorchView):
        view = _TorchView(torch)
        module.torch = view
    return view


def _cpu_factory(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def _patch_current_device() -> None:
    # Megatron allocates communication buffers, p2p receive buffers, the global memory buffer and
    # DDP's param/grad buffers on `torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_synchronize() -> None:
    # dist_checkpointing save and pipeline p2p (batch_p2p_sync=True) synchronise the CUDA stream.
    # CPU kernels are synchronous, so there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None


def _patch_tensor_cuda() -> None:
    # `.cuda()` moves tensors to "the accelerator" (tied-embedding sync with PP>1, optimizer-state
    # reload). Here the accelerator is the CPU.
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, memory_format=None: self


def _patch_tensor_type_names() -> None:
    # The (distributed) optimizer dispatches on `param.type()` being 'torch.cuda.FloatTensor' etc.
    # and clip_grad_by_total_norm_fp32 asserts it. Report CUDA names to Megatron callers only.
    original = torch.Tensor.type

    def type_as_seen_by_megatron(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and _called_from_megatron():
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_seen_by_megatron


def _patch_cuda_rng() -> None:
    # The tensor-parallel RNG tracker saves, forks and restores the CUDA generator. On CPU builds
    # `torch.cuda.manual_seed` silently does nothing, so TP/dropout seeding would be silently
    # wrong; point the tracker at the CPU generator instead. Consequence (documented in README):
    # `model_parallel_cuda_manual_seed` also reseeds the CPU generator, so seed anything else
    # after it.
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    random_module._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    random_module._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )
    cuda_view = _TorchView(torch.cuda)
    cuda_view.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda_view.manual_seed = torch.manual_seed
    _torch_view_of(random_module.__name__).cuda = cuda_view
    # Inside a fork the CPU generator *is* the tracked state, so Megatron's "CPU RNG state changed
    # within GPU RNG context" warning fires on every dropout call; it is expected here.
    logging.getLogger(random_module.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def _patch_device_literals() -> None:
    for module_name in _DEVICE_LITERAL_MODULES:
        view = _torch_view_of(module_name)
        for factory in _FACTORIES:
            setattr(view, factory, _cpu_factory(getattr(torch, factory)))
    # exchange_utils also allocates through `ShardedTensor.init_data("cuda")`, a Megatron method
    # whose factory is bound at definition time: redirect its device argument instead.
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    init_data = ShardedTensor.init_data

    @functools.wraps(init_data)
    def init_data_on_cpu(self, device, init_fn=torch.empty):
        return init_data(self, "cpu" if _is_cuda_device(device) else device, init_fn)

    ShardedTensor.init_data = init_data_on_cpu


PATCHES: tuple[Patch, ...] = (
    Patch("current_device", "torch.cuda.current_device() -> cpu", _patch_current_device),
    Patch("cuda_rng", "tensor-parallel RNG tracker on the CPU generator", _patch_cuda_rng),
    Patch("device_literals", 'device="cuda" tensor factories in Megatron', _patch_device_literals),
    Patch("tensor_cuda", "Tensor.cuda() is a no-op", _patch_tensor_cuda),
    Patch("tensor_type_names", "Tensor.type() reports torch.cuda.* to Megatron", _patch_tensor_type_names),
    Patch("synchronize", "torch.cuda.synchronize() is a no-op", _patch_synchronize),
)
PATCH_NAMES = tuple(patch.name for patch in PATCHES)

_applied: list[str] = []


def applied_patches() -> tuple[str, ...]:
    """Names of the patches applied in this process (empty on a CUDA machine)."""
    return tuple(_applied)


def apply_cpu_compat(skip: Iterable[str] = ()) -> tuple[str, ...]:
    """Apply every patch not in `skip`, once per process; returns the names applied.

    `skip` exists so the tests can show each patch is necessary. Raises on a CUDA machine: the
    GPU path must run Megatron-Core unmodified.
    """
    if torch.cuda.is_available():
        raise RuntimeError(
            "the CPU compatibility layer must not be applied when CUDA is available; "
            "use rift_megatron.platform.current_platform() to pick the platform"
        )
    skip = set(skip)
    unknown = skip - set(PATCH_NAMES)
    if unknown:
        raise ValueError(f"unknown CPU compat patch(es) {sorted(unknown)}; known: {PATCH_NAMES}")
    for patch in PATCHES:
        if patch.name not in skip and patch.name not in _applied:
            patch.apply()
            _applied.append(patch.name)
    return applied_patches()

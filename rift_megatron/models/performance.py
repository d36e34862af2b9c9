"""Which fast kernels and communication overlaps a run uses: one decision, one table.

Megatron-LM users get fused kernels and overlapped communication on GPUs; a CPU run must keep the
plain PyTorch math (the fused kernels are CUDA / Triton code, and the CPU results are this
project's reference). `performance_options` decides every switch from facts alone (platform,
layer implementation, which kernel packages import, layout, optimizer), so the table can be
printed and tested per platform on a machine without a GPU (tests/unit/test_performance_options.py).
`GPTModelProvider` applies it to the `TransformerConfig`, `wrap_for_training` to DDP, and
`rift train` exports `launch_environment` before CUDA starts.

Each rule, and why (megatron-core 0.16.1):
- bias_activation_fusion, bias_dropout_fusion: `torch.compile`d SwiGLU / bias-dropout-add
  (`megatron.core.fusions`), on any CUDA machine, TE or not.
- apply_rope_fusion: TE's fused RoPE kernel (`TransformerConfig` refuses it without TE).
- gradient_accumulation_fusion: apex's `fused_weight_gradient_mlp_cuda`; with TE layers too, since
  GPTModel's output layer is Megatron's own ColumnParallelLinear, which raises without apex.
- masked_softmax_fusion: apex's `scaled_*_masked_softmax_cuda`, used by the local attention only
  (TE's attention picks flash / cuDNN fused attention itself: `attention_backend` auto).
- persist_layer_norm: apex's FusedLayerNorm only; neither of our norms reads it: off.
- tp_comm_overlap: needs TE userbuffers initialised over MPI / a bootstrap backend before the
  model is built; not wired: off everywhere.
- overlap_grad_reduce / overlap_param_gather (DDP with the distributed optimizer): default on
  with CUDA, off on CPU (a SIGSEGV was once seen with them on gloo, see PLATFORM.md); either can
  be forced with `parallel.overlap_grad_reduce` / `parallel.overlap_param_gather`. Param gather
  overlap needs the distributed optimizer and grad-reduce overlap (Megatron-LM's rule).
- CUDA_DEVICE_MAX_CONNECTIONS=1 with CUDA and tensor parallelism (Megatron's TP / sequence
  parallel communication relies on kernel order on one hardware queue; it warns otherwise).
"""

from __future__ import annotations

import importlib.util
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, replace

from rift_megatron.parallel import ParallelLayout
from rift_megatron.platform import Platform
from rift_megatron.platform.device import LayerImpl, transformer_engine_available


@dataclass(frozen=True)
class KernelPackages:
    """Which optional kernel packages this process can import (checked without importing)."""

    transformer_engine: bool = False
    apex_fused_wgrad: bool = False
    apex_masked_softmax: bool = False

    @classmethod
    def detect(cls) -> "KernelPackages":
        def importable(name: str) -> bool:
            return importlib.util.find_spec(name) is not None

        return cls(
            transformer_engine=transformer_engine_available(),
            apex_fused_wgrad=importable("fused_weight_gradient_mlp_cuda"),
            apex_masked_softmax=importable("scaled_upper_triang_masked_softmax_cuda")
            and importable("scaled_masked_softmax_cuda"),
        )


@dataclass(frozen=True)
class OverlapRequest:
    """The user's `parallel.overlap_*` switches; None: the platform default."""

    grad_reduce: bool | None = None
    param_gather: bool | None = None


@dataclass(frozen=True)
class PerformanceOptions:
    """Every switch decided; the field names are Megatron's."""

    bias_activation_fusion: bool
    bias_dropout_fusion: bool
    apply_rope_fusion: bool
    gradient_accumulation_fusion: bool
    masked_softmax_fusion: bool
    persist_layer_norm: bool
    attention: str  # "transformer_engine (flash / cuDNN fused)" or "local (unfused PyTorch)"
    tp_comm_overlap: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    align_param_gather: bool
    cuda_device_max_connections: str | None

    def transformer_config_fields(self) -> dict[str, bool]:
        """The fields of Megatron's `TransformerConfig` this table sets."""
        return {name: getattr(self, name) for name in (
            "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
            "masked_softmax_fusion", "persist_layer_norm", "tp_comm_overlap",
        )}

    def without_fusions(self) -> "PerformanceOptions":
        """The same table with every kernel fusion off: the CPU's plain PyTorch math, on any device."""
        return replace(self, **dict.fromkeys(self.transformer_config_fields(), False))

    def table(self) -> str:
        """`name=value` for every option, on one line (printed by `rift train` at start)."""
        return ", ".join(f"{name}={value}" for name, value in asdict(self).items())


class OverlapConfigError(ValueError):
    """An overlap switch that cannot apply to this optimizer set-up."""


def performance_options(
    platform: Platform,
    layer_impl: LayerImpl,
    layout: ParallelLayout,
    packages: KernelPackages,
    use_distributed_optimizer: bool,
    overlap: OverlapRequest = OverlapRequest(),
) -> PerformanceOptions:
    """The option table for these facts (see the module docstring for each rule)."""
    cuda = platform.is_cuda
    te_layers = layer_impl == "transformer_engine"
    if overlap.param_gather and not use_distributed_optimizer:
        raise OverlapConfigError("parallel.overlap_param_gather needs optim.use_distributed_optimizer: true")
    # Asking for the param gather overlap implies the grad reduce overlap it needs.
    grad_reduce = (cuda or bool(overlap.param_gather)) if overlap.grad_reduce is None else overlap.grad_reduce
    if overlap.param_gather and not grad_reduce:
        raise OverlapConfigError("parallel.overlap_param_gather needs parallel.overlap_grad_reduce (Megatron's rule)")
    param_gather = (cuda and grad_reduce and use_distributed_optimizer) if overlap.param_gather is None \
        else overlap.param_gather
    return PerformanceOptions(
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=cuda and packages.transformer_engine,
        gradient_accumulation_fusion=cuda and packages.apex_fused_wgrad,
        masked_softmax_fusion=cuda and not te_layers and packages.apex_masked_softmax,
        persist_layer_norm=False,
        attention="transformer_engine (flash / cuDNN fused)" if te_layers else "local (unfused PyTorch)",
        tp_comm_overlap=False,
        overlap_grad_reduce=grad_reduce,
        overlap_param_gather=param_gather,
        # With pipeline stages, all-gathers are started by the schedule in stage order (Megatron-LM's default).
        align_param_gather=param_gather and layout.pipeline > 1,
        cuda_device_max_connections=_max_connections(platform, layout),
    )


def _max_connections(platform: Platform, layout: ParallelLayout) -> str | None:
    return "1" if platform.is_cuda and layout.tensor > 1 else None


def launch_environment(platform: Platform, layout: ParallelLayout) -> dict[str, str]:
    """Environment variables that must be set before CUDA initialises in this process."""
    value = _max_connections(platform, layout)
    return {} if value is None else {"CUDA_DEVICE_MAX_CONNECTIONS": value}


def apply_launch_environment(platform: Platform, layout: ParallelLayout,
                             environ: MutableMapping[str, str]) -> dict[str, str]:
    """Set `launch_environment` in `environ` (overriding another value: Megatron needs these); return it."""
    env = launch_environment(platform, layout)
    environ.update(env)
    return env

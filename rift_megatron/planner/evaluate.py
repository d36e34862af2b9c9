"""One layout's figures: both phases' memory (the memory model), the push, the step time, the verdict.

The layout becomes the `RiftConfig` a user would write for it, and that config goes through the
same code the trainer's start-up uses: `config.checks.world_problems` (batch and rollout splits) and
`memory_model.estimate` (per-GPU bytes of training, push and rollout). So a layout the planner
calls feasible is one `rift train` accepts, and its figures are the ones `rift train` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rift_megatron.config.checks import world_problems
from rift_megatron.config.runtime import offload_switches
from rift_megatron.config.schema import (
    DataConfig,
    ModelConfig,
    OptimSection,
    ParallelConfig,
    RiftConfig,
    RolloutConfig,
    TrainingConfig,
)
from rift_megatron.memory_model import GIB, MemoryEstimate, estimate
from rift_megatron.planner.space import UTILIZATIONS, Layout, PlanRequest
from rift_megatron.planner.step_time import Parallelism, StepTime, Workload, step_time, waves_needed


@dataclass(frozen=True)
class LayoutPlan:
    """A layout with its engine budget, memory per phase (GiB), push volume and step time."""

    layout: Layout
    gpu_memory_utilization: float
    memory: MemoryEstimate
    push_gib_per_gpu: float
    waves: int
    step: StepTime
    feasible: bool
    reason: str

    @property
    def train_memory_gib(self) -> float:
        """The trainer-resident peak: training, or the push (trainer state resident, engine weights awake)."""
        return max(self.memory.training_total, self.memory.push_total) / GIB

    @property
    def rollout_memory_gib(self) -> float:
        return self.memory.rollout_total / GIB

    @property
    def per_gpu_memory_gib(self) -> float:
        return max(self.train_memory_gib, self.rollout_memory_gib)

    def as_dict(self) -> dict:
        """The JSON record of `rift plan --json` (its `recommended` and each of its `layouts`)."""
        lay, m = self.layout, self.memory
        return {
            "tp": lay.tensor, "pp": lay.pipeline, "vpp": lay.virtual_pipeline, "cp": lay.context, "dp": lay.data,
            "sequence_parallel": lay.sequence_parallel, "micro_batch_size": lay.micro_batch_size,
            "recompute": lay.recompute, "engine_tp": lay.engine_tensor,
            "gpu_memory_utilization": self.gpu_memory_utilization, "offload": lay.offload,
            "per_gpu_memory_gib": round(self.per_gpu_memory_gib, 2),
            "train_memory_gib": round(self.train_memory_gib, 2),
            "rollout_memory_gib": round(self.rollout_memory_gib, 2),
            "training_phase_gib": round(m.training_total / GIB, 2), "push_phase_gib": round(m.push_total / GIB, 2),
            "trainer_state_gib": round(m.trainer_state / GIB, 2), "activations_gib": round(m.activations / GIB, 2),
            "logprob_buffers_gib": round(m.logprob_buffers / GIB, 2),
            "engine_weights_gib": round(m.engine_weights / GIB, 2), "kv_cache_gib": round(m.kv_cache / GIB, 2),
            "kv_tokens": m.kv_tokens, "rollout_waves": self.waves,
            "push_gib_per_gpu": round(self.push_gib_per_gpu, 2),
            "step_seconds": round(self.step.total, 2), "step_breakdown_seconds": self.step.as_dict(),
            "feasible": self.feasible, "reason": self.reason,
        }


def layout_config(request: PlanRequest, layout: Layout, utilization: float) -> RiftConfig:
    """The bf16 co-located RIFT config of `layout` (one optimizer step per rollout)."""
    switch = None if layout.offload else False  # null: on with CUDA (memory_model counts it as on)
    return RiftConfig(
        model=ModelConfig(dtype="bf16"),
        parallel=ParallelConfig(tensor=layout.tensor, pipeline=layout.pipeline,
                                virtual_pipeline=layout.virtual_pipeline, context=layout.context,
                                sequence_parallel=layout.sequence_parallel),
        optim=OptimSection(use_distributed_optimizer=True),
        data=DataConfig(mode="online", prompts_per_step=request.prompts_per_step),
        rollout=RolloutConfig(k=request.k, max_tokens=request.seq_len - request.prompt_len,
                              max_model_len=request.seq_len, engine_tensor_parallel=layout.engine_tensor,
                              engine_dtype="bfloat16", gpu_memory_utilization=utilization,
                              param_offload=switch, grad_offload=switch, optimizer_offload=switch),
        training=TrainingConfig(global_batch_size=request.prompts_per_step * request.k,
                                micro_batch_size=layout.micro_batch_size, recompute=layout.recompute),
    )


def workload(request: PlanRequest) -> Workload:
    return Workload(prompts_per_step=request.prompts_per_step, k=request.k, prompt_tokens=request.prompt_len,
                    response_tokens=request.response_len, max_response_tokens=request.seq_len - request.prompt_len)


def _rollout_figures(request: PlanRequest, cfg: RiftConfig, usable: int) -> tuple[float, MemoryEstimate, int]:
    """The engine budget for `cfg`'s layout: the smallest of UTILIZATIONS whose KV cache holds every
    sequence of the engine's share of the rollout at once, else the largest that fits beside what the
    trainer keeps (the engine then generates in waves); the user's value when given. Both tests are
    monotonic in the budget, so each is a bisection (a few memory-model calls, not one per value)."""
    sequences = -(-request.prompts_per_step * request.k // (request.world // cfg.rollout.engine_tensor_parallel))
    choices = [request.gpu_memory_utilization] if request.gpu_memory_utilization else list(UTILIZATIONS)
    figures: dict[int, tuple[float, MemoryEstimate, int]] = {}

    def at(index: int) -> tuple[float, MemoryEstimate, int]:
        if index not in figures:
            rollout = dataclasses.replace(cfg.rollout, gpu_memory_utilization=choices[index])
            memory = estimate(dataclasses.replace(cfg, rollout=rollout), request.arch, request.world,
                              request.gpu_memory_gib, request.prompt_len)
            figures[index] = (choices[index], memory, waves_needed(sequences, memory.kv_tokens // request.seq_len))
        return figures[index]

    def first(predicate) -> int:  # the first index where a monotonic predicate turns true (len: never)
        low, high = 0, len(choices)
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if predicate(at(middle)) else (middle + 1, high)
        return low

    whole = first(lambda f: f[2] == 1)
    if whole < len(choices) and at(whole)[1].rollout_total <= usable:
        return at(whole)
    largest_fitting = first(lambda f: f[1].rollout_total > usable) - 1
    if largest_fitting >= 0 and at(largest_fitting)[2]:
        return at(largest_fitting)
    return at(0)


def evaluate(request: PlanRequest, layout: Layout) -> LayoutPlan | None:
    """`layout`'s figures, or None when its batch / rollout sizes do not split over the world."""
    cfg = layout_config(request, layout, UTILIZATIONS[0])
    if next(world_problems(cfg, request.world), None) is not None:
        return None
    return evaluate_config(request, cfg, layout)


def evaluate_config(request: PlanRequest, cfg: RiftConfig, layout: Layout) -> LayoutPlan:
    """The figures of `cfg` (whose sizes are `layout`'s) for `request`'s cluster and workload."""
    usable = int((request.gpu_memory_gib - request.headroom_gib) * GIB)
    utilization, memory, waves = _rollout_figures(request, cfg, usable)
    # the shard path (rollout/weight_sync.py push_path: sync_path auto, engine TP = trainer TP) receives
    # the engine's own shard, the gather path the whole model
    shard = cfg.rollout.sync_path == "auto" and layout.engine_tensor == layout.tensor
    push_bytes = memory.engine_weights * (1 if shard else layout.engine_tensor)
    switches = offload_switches(cfg, cuda=True)  # gradients are freed, not copied
    offload_bytes = (memory.trainer_weights * switches["params"] + memory.trainer_optimizer * switches["optimizer"])
    micro_batches = request.prompts_per_step * request.k // (layout.data * layout.micro_batch_size)
    sizes = Parallelism(tensor=layout.tensor, pipeline=layout.pipeline, virtual_pipeline=layout.virtual_pipeline,
                        context=layout.context, data=layout.data, hidden_size=request.arch.hidden_size,
                        num_layers=request.arch.num_layers, micro_batches=micro_batches,
                        full_recompute=layout.recompute == "full", single_node=request.nodes == 1)
    step = step_time(request.arch.num_parameters(), request.world, workload(request), request.hardware, sizes,
                     engine_weight_bytes_per_gpu=memory.engine_weights,
                     waves=max(waves, 1), push_bytes_per_gpu=push_bytes, offload_bytes_per_gpu=offload_bytes)
    reason = _verdict(memory, waves, usable, request.headroom_gib)
    return LayoutPlan(layout=layout, gpu_memory_utilization=utilization, memory=memory,
                      push_gib_per_gpu=push_bytes / GIB, waves=waves, step=step, feasible=not reason, reason=reason)


def _verdict(memory: MemoryEstimate, waves: int, usable: int, headroom_gib: float) -> str:
    """Why the layout does not fit ('' when it does), the phases that overflow named with their figures."""
    limit = f"{usable / GIB:.1f} GiB usable ({memory.gpu / GIB:.1f} GiB minus {headroom_gib:g} GiB headroom)"
    over = [f"{name} needs {total / GIB:.1f} GiB" for name, total in (
        ("training", memory.training_total), ("the weight push", memory.push_total),
        ("rollout", memory.rollout_total)) if total > usable]
    if over:
        return f"{', '.join(over)} per GPU > {limit}"
    if waves == 0:
        return "the engine's KV cache cannot hold one sequence of seq_len tokens"
    return ""

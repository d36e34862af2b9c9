"""The planner's figures for one existing config: what `rift train` prints at start, what the
examples quote, what their tests check."""

from __future__ import annotations

from rift_megatron.config.runtime import offload_switches
from rift_megatron.config.schema import RiftConfig
from rift_megatron.memory_model import DEFAULT_PROMPT_TOKENS, H100_80GB_GIB, layout_of
from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.planner.evaluate import LayoutPlan, evaluate_config
from rift_megatron.planner.space import Layout, PlanRequest

GPUS_PER_NODE = 8


def config_layout(cfg: RiftConfig, world: int) -> Layout:
    """The planner's Layout of `cfg` on `world` ranks (offload: any switch on, as on CUDA)."""
    sizes, r = layout_of(cfg, world), cfg.rollout
    return Layout(tensor=sizes.tensor, pipeline=sizes.pipeline, virtual_pipeline=sizes.virtual_pipeline,
                  context=sizes.context, data=sizes.data, sequence_parallel=sizes.sequence_parallel,
                  micro_batch_size=cfg.training.micro_batch_size, recompute=cfg.training.recompute,
                  engine_tensor=r.engine_tensor_parallel,
                  offload=any(offload_switches(cfg, cuda=True).values()))


def predict(cfg: RiftConfig, arch: ModelArchitecture, world: int, gpus_per_node: int = GPUS_PER_NODE,
            gpu_memory_gib: float = H100_80GB_GIB, headroom_gib: float = 4.0, prompt_len: int | None = None,
            response_len: int | None = None) -> LayoutPlan:
    """`cfg` on `world` GPUs: both phases' memory, push and step time, and whether it fits. Without
    mean lengths the step time is an upper bound: every prompt at its budget (seq_len - max_tokens)
    and every response at rollout.max_tokens."""
    r = cfg.rollout
    seq_len = r.max_model_len or DEFAULT_PROMPT_TOKENS + r.max_tokens
    per_node = gpus_per_node if world % gpus_per_node == 0 else world  # uneven nodes: planned as one
    request = PlanRequest(
        arch=arch, nodes=max(1, world // per_node), gpus_per_node=per_node, gpu_memory_gib=gpu_memory_gib,
        seq_len=seq_len, k=r.k, prompts_per_step=cfg.data.prompts_per_step,
        prompt_len=prompt_len or max(1, seq_len - r.max_tokens), response_len=response_len or r.max_tokens,
        headroom_gib=headroom_gib, gpu_memory_utilization=r.gpu_memory_utilization)
    return evaluate_config(request, cfg, config_layout(cfg, world))


def startup_prediction(cfg: RiftConfig, arch: ModelArchitecture, world: int, gpus_per_node: int,
                       on_gpu: bool) -> str:
    """What `rift train` prints before it starts: the planner's figures for its own config and world,
    on H100 80 GB GPUs (the device the model is written for; on the CPU, what a GPU run would need)."""
    from rift_megatron.planner.report import layout_summary
    from rift_megatron.planner.step_time import Hardware

    plan = predict(cfg, arch, world, gpus_per_node=gpus_per_node)
    where = "" if on_gpu else " (this run is on the CPU: the figures are those of the same run on H100 GPUs)"
    verdict = "fits" if plan.feasible else f"does NOT fit: {plan.reason}"
    if cfg.data.mode != "online":
        m = plan.memory
        return (f"planner: {plan.layout.name()} on {world} x H100 80 GB{where}: training "
                f"{(m.training_total - m.engine_while_training) / 2**30:.1f} GiB per GPU (offline: no engine)")
    return (f"planner: {plan.layout.name()} on {world} x H100 80 GB {verdict}{where}; step time is an upper bound "
            f"(every response at rollout.max_tokens)\n{layout_summary(plan, Hardware(), world)}")

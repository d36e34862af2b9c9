"""The layouts a plan considers: every combination Megatron and vLLM can run for a model and a cluster.

A layout fixes the trainer's TP, PP, VPP, CP (DP is what the world leaves), sequence parallelism,
micro-batch size and recomputation, the engines' TP, and whether the trainer is offloaded during
rollouts; the engine's `gpu_memory_utilization` is then chosen per layout (planner/evaluate.py).
Pruned on purpose, each for a stated reason:

* TP and engine TP stay within a node (tensor-parallel all-reduces every layer need NVLink);
* sequence parallelism is on whenever TP > 1 (it only shards activations further: less memory,
  the same FLOPs);
* recomputation is `none` or `full`: `selective` saves nothing over `none` with flash attention
  (the memory model stores no attention scores);
* VPP is off or one of the two smallest chunk counts that divide the stage's layers (more chunks
  only shrink a bubble that is already small at RL's hundreds of micro-batches);
* CP needs the sequence to split into 2 x CP chunks (Megatron's load-balanced CP).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.models.sharding import sharding_problem
from rift_megatron.planner.step_time import Hardware

Offload = Literal["auto", "on", "off"]
MICRO_BATCH_SIZES = (1, 2)
RECOMPUTE = ("none", "full")
# Engine gpu_memory_utilization values a plan may choose from.
UTILIZATIONS = tuple(round(0.30 + 0.05 * i, 2) for i in range(13))  # 0.30 ... 0.90


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks: a model, a cluster and a workload (`rift plan`'s flags)."""

    arch: ModelArchitecture
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    seq_len: int  # longest sample (prompt + response): the micro-batch and engine context length
    k: int
    prompts_per_step: int
    prompt_len: int  # mean prompt tokens (step time)
    response_len: int  # mean response tokens (step time)
    offload: Offload = "auto"
    headroom_gib: float = 4.0
    hardware: Hardware = field(default_factory=Hardware)
    # Layout dimensions the user fixed (None: enumerate).
    tensor: int | None = None
    pipeline: int | None = None
    virtual_pipeline: int | None = None
    context: int | None = None
    engine_tensor: int | None = None
    gpu_memory_utilization: float | None = None
    micro_batch_size: int | None = None
    recompute: str | None = None

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    """One candidate: the trainer's parallel sizes and options, the engines' TP, the offload switch."""

    tensor: int
    pipeline: int
    virtual_pipeline: int | None
    context: int
    data: int
    sequence_parallel: bool
    micro_batch_size: int
    recompute: str
    engine_tensor: int
    offload: bool

    @property
    def model_parallel(self) -> int:
        """Ranks one model replica spans (TP x CP x PP): what the planner breaks ties against."""
        return self.tensor * self.context * self.pipeline

    def name(self) -> str:
        vpp = f" VPP{self.virtual_pipeline}" if self.virtual_pipeline else ""
        cp = f" CP{self.context}" if self.context > 1 else ""
        return (f"TP{self.tensor} PP{self.pipeline}{vpp}{cp} DP{self.data} mbs{self.micro_batch_size} "
                f"recompute={self.recompute} engine TP{self.engine_tensor} offload={'on' if self.offload else 'off'}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _virtual_pipelines(layers_per_stage: int, pipeline: int) -> list[int | None]:
    if pipeline == 1:
        return [None]
    return [None, *[v for v in range(2, layers_per_stage + 1) if layers_per_stage % v == 0][:2]]


def _pinned(values: list, pin) -> list:
    """The value the user fixed (checked like the others afterwards), else every value."""
    return [pin] if pin is not None else values


def layouts(request: PlanRequest) -> Iterator[Layout]:
    """Every layout of `request` that divides its world and its model (see the module docstring)."""
    arch, world, node = request.arch, request.world, request.gpus_per_node
    tensors = [t for t in _pinned(_divisors(node), request.tensor) if sharding_problem(arch, t, 1) is None]
    engines = [e for e in _pinned(_divisors(node), request.engine_tensor)
               if world % e == 0 and arch.num_attention_heads % e == 0]
    contexts = [c for c in _pinned([1, 2, 4, 8], request.context) if request.seq_len % (2 * c) == 0 or c == 1]
    offloads = {"auto": [True, False], "on": [True], "off": [False]}[request.offload]
    for tensor, context in itertools.product(tensors, contexts):
        if world % (tensor * context):
            continue
        for pipeline in _pinned(_divisors(world // (tensor * context)), request.pipeline):
            if (world // (tensor * context)) % pipeline or sharding_problem(arch, tensor, pipeline) is not None:
                continue
            vpps = [v for v in _pinned(_virtual_pipelines(arch.num_layers // pipeline, pipeline),
                                       request.virtual_pipeline)
                    if v is None or (pipeline > 1 and sharding_problem(arch, tensor, pipeline, v) is None)]
            for vpp, mbs, recompute, engine, offload in itertools.product(
                    vpps, _pinned(list(MICRO_BATCH_SIZES), request.micro_batch_size),
                    _pinned(list(RECOMPUTE), request.recompute), engines, offloads):
                yield Layout(tensor=tensor, pipeline=pipeline, virtual_pipeline=vpp, context=context,
                             data=world // (tensor * pipeline * context), sequence_parallel=tensor > 1,
                             micro_batch_size=mbs, recompute=recompute, engine_tensor=engine, offload=offload)

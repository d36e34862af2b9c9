"""How long one co-located RIFT step takes: a FLOP model with its assumptions in the open.

One step = one rollout (prefill + decode of prompts_per_step x k samples by the engines), the
weight push into the engines, the trainer's offload around the rollout, and one optimizer step on
the rollout's samples. Each part is work / (rate x efficiency):

* training: 6 x parameters x tokens FLOPs (Kaplan et al.; forward 2, backward 4), 8 x with full
  recomputation (the forward is rerun), stretched by the pipeline bubble (PP - 1) / (VPP x m) of
  Megatron's interleaved 1F1B schedule with m micro-batches per data-parallel rank;
* generation: 2 x parameters per prompt token (prefill, at the training efficiency) and per
  generated token (decode, at `DECODE_MFU`); decoding also never beats reading the engine's weights
  from HBM once per decoding step, for each wave of sequences the KV cache cannot hold at once;
* tensor-parallel communication, which a FLOP count does not see: Megatron all-reduces (with sequence
  parallelism: reduce-scatters and all-gathers, the same bytes) the [tokens, hidden] activations twice
  per layer forward and twice backward (three times forward with full recomputation), a ring moving
  2 (TP - 1) / TP of them per GPU at `NVLINK_GBPS`; the data-parallel reduction of the fp32 gradients
  (reduce-scatter plus the parameter all-gather of the distributed optimizer) at `DATA_PARALLEL_GBPS`
  across nodes (`NVLINK_GBPS` within one);
* push: the bytes each GPU receives (rift_megatron/rollout/shard_push.py: its own shard when the
  engine's TP equals the trainer's, else the whole model) at `PUSH_GBPS`;
* offload: the trainer's weights and optimizer state out to host memory and back at `HOST_LINK_GBPS`.

The efficiencies are assumptions, printed with every plan. NOT measured on a GPU by this project:
`TRAIN_MFU` is the training MFU NeMo-RL's Megatron backend reports for dense 8B-70B GRPO on H100
(~0.3: 28 s for a 70B step of ~1.3M tokens on 64 GPUs); `DECODE_MFU` is what RL rollouts with long
response tails reach (NeMo-RL's 70B generation: ~2% of bf16 peak); the planner's tests check the
whole model against published step times within 2x, which is all these constants are good for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# H100 SXM: dense bf16 tensor-core peak and HBM3 bandwidth (NVIDIA's datasheet).
H100_BF16_TFLOPS = 989.0
H100_HBM_GBPS = 3350.0
TRAIN_MFU = 0.32
DECODE_MFU = 0.03
# Trainer -> engine weight push, per receiving GPU: gather over NVLink / the network, the CUDA IPC
# handoff and vLLM's load_weights. An assumption, NOT measured on a GPU.
PUSH_GBPS = 10.0
# NCCL bus bandwidth of large all-reduces within an 8-GPU H100 NVLink node, and per GPU across nodes
# (one 400 Gb/s NIC per GPU). Assumptions, NOT measured on a GPU.
NVLINK_GBPS = 300.0
DATA_PARALLEL_GBPS = 40.0
# Host <-> GPU copies of the offloaded trainer state (pinned PCIe Gen5, per GPU). An assumption.
HOST_LINK_GBPS = 20.0

GB = 1e9


@dataclass(frozen=True)
class Workload:
    """What one step processes: samples and their mean lengths (memory uses the maximum, seq_len)."""

    prompts_per_step: int
    k: int
    prompt_tokens: float  # mean prompt length
    response_tokens: float  # mean generated length
    max_response_tokens: int  # the longest a response may run (decode steps of one wave)

    @property
    def samples(self) -> int:
        return self.prompts_per_step * self.k

    @property
    def training_tokens(self) -> float:
        return self.samples * (self.prompt_tokens + self.response_tokens)


@dataclass(frozen=True)
class Hardware:
    """One GPU's rates and the assumed efficiencies the step time is computed with."""

    tflops: float = H100_BF16_TFLOPS
    hbm_gbps: float = H100_HBM_GBPS
    train_mfu: float = TRAIN_MFU
    decode_mfu: float = DECODE_MFU
    push_gbps: float = PUSH_GBPS
    host_link_gbps: float = HOST_LINK_GBPS
    nvlink_gbps: float = NVLINK_GBPS
    data_parallel_gbps: float = DATA_PARALLEL_GBPS

    def assumptions(self) -> str:
        """One line naming every rate and efficiency behind a step time."""
        return (f"{self.tflops:g} TFLOP/s bf16 per GPU at MFU {self.train_mfu:g} (training, prefill) and "
                f"{self.decode_mfu:g} (decode); HBM {self.hbm_gbps:g} GB/s; TP all-reduce {self.nvlink_gbps:g} GB/s, "
                f"DP reduction {self.data_parallel_gbps:g} GB/s, push {self.push_gbps:g} GB/s and offload "
                f"{self.host_link_gbps:g} GB/s per GPU (assumptions, not measured on a GPU)")


@dataclass(frozen=True)
class StepTime:
    """Seconds of each part of one step; `total` is their sum (nothing overlaps in a co-located step)."""

    train: float
    tensor_comm: float
    data_comm: float
    prefill: float
    decode: float
    push: float
    offload: float

    @property
    def total(self) -> float:
        return self.train + self.tensor_comm + self.data_comm + self.prefill + self.decode + self.push + self.offload

    def as_dict(self) -> dict[str, float]:
        return {**{name: round(value, 3) for name, value in asdict(self).items()}, "total": round(self.total, 3)}


def pipeline_bubble(pipeline: int, virtual_pipeline: int | None, micro_batches: int) -> float:
    """Megatron's interleaved 1F1B bubble fraction: (PP - 1) / (VPP x micro-batches)."""
    return (pipeline - 1) / ((virtual_pipeline or 1) * max(1, micro_batches))


@dataclass(frozen=True)
class Parallelism:
    """The model's and layout's sizes the communication and bubble terms need."""

    hidden_size: int
    num_layers: int
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    context: int = 1
    data: int = 1
    micro_batches: int = 1  # per data-parallel rank and step
    full_recompute: bool = False
    single_node: bool = False  # the data-parallel reduction then runs over NVLink

    def tensor_comm_bytes(self, tokens: float) -> float:
        """Bytes one GPU moves in TP collectives to train on `tokens` (all DP replicas' tokens)."""
        if self.tensor == 1:
            return 0.0
        per_layer_token = (6 if self.full_recompute else 4) * self.hidden_size * 2 * 2 * (self.tensor - 1) / self.tensor
        return tokens / (self.data * self.context) * self.num_layers / self.pipeline * per_layer_token


def step_time(parameters: int, world: int, work: Workload, hw: Hardware, layout: Parallelism, *,
              engine_weight_bytes_per_gpu: float = 0.0, waves: int = 1, push_bytes_per_gpu: float = 0.0,
              offload_bytes_per_gpu: float = 0.0) -> StepTime:
    """One step's seconds on `world` GPUs (see the module docstring for each term)."""
    rate = world * hw.tflops * 1e12
    train_flops = (8 if layout.full_recompute else 6) * parameters * work.training_tokens
    bubble = 1 + pipeline_bubble(layout.pipeline, layout.virtual_pipeline, layout.micro_batches)
    train = train_flops / (rate * hw.train_mfu) * bubble
    grads = 4 * parameters / (layout.tensor * layout.pipeline)
    data_gbps = hw.nvlink_gbps if layout.single_node else hw.data_parallel_gbps
    data_comm = 2 * grads * (layout.data - 1) / layout.data / (data_gbps * GB)
    prefill = 2 * parameters * work.samples * work.prompt_tokens / (rate * hw.train_mfu)
    decode_compute = 2 * parameters * work.samples * work.response_tokens / (rate * hw.decode_mfu)
    decode_bandwidth = waves * work.max_response_tokens * engine_weight_bytes_per_gpu / (hw.hbm_gbps * GB)
    return StepTime(
        train=train, tensor_comm=layout.tensor_comm_bytes(work.training_tokens) * bubble / (hw.nvlink_gbps * GB),
        data_comm=data_comm, prefill=prefill, decode=max(decode_compute, decode_bandwidth),
        push=push_bytes_per_gpu / (hw.push_gbps * GB), offload=2 * offload_bytes_per_gpu / (hw.host_link_gbps * GB),
    )


def waves_needed(sequences: int, concurrent: int) -> int:
    """Rounds of generation an engine runs when its KV cache holds `concurrent` sequences at once."""
    return math.ceil(sequences / concurrent) if concurrent > 0 else 0

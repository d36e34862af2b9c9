"""Per-GPU memory of a co-located RIFT run: the one model of it (issue 15; the planner builds on it).

Pure Python (no torch at import), so a planner can evaluate many layouts in milliseconds.

A co-located rank goes through three peaks, and each is modelled in bytes:

* **training**: the trainer's state (weights, DDP gradient buffer, optimizer state), the activations
  of the micro-batches in flight and the log-prob buffers of the last pipeline stage; the engine
  sleeps at level 2 (weights and KV cache released);
* **push**: the engine has woken its weights and receives the trainer's, whose state is still
  resident (the offload comes after the push), plus one push bucket;
* **rollout**: what the offload switches leave of the trainer, plus vLLM's whole budget
  (`gpu_memory_utilization` x GPU memory, inside which its weights, activations and KV cache live).

Each peak also carries `CUDA_RESERVE_GIB` (CUDA context, NCCL buffers, what a sleeping vLLM keeps:
an assumption, not measured on a GPU).

Training state, in OUR setup (`training/setup.py`): weights in `model.dtype` (2 B for bf16 / fp16,
4 B for fp32), Megatron DDP's gradient buffer with `grad_reduce_in_fp32=True` (4 B), and Adam
(2 fp32 moments, 8 B) plus, for a bf16 / fp16 model, fp32 main parameters (4 B); the distributed
optimizer shards those 12 B over the data-parallel ranks. For bf16 that is Megatron-LM's "18 bytes
per parameter, 6 + 12 / DP with the distributed optimizer" (`num_bytes_per_parameter` in
megatron/training/theoretical_memory_usage.py); an fp32 model has no main-parameter copy: 16, or
8 + 8 / DP. Megatron pads each parameter's start to 64 elements and each bucket to lcm(DP, 128)
with the distributed optimizer: the model ignores that padding (< 0.01% at 8B+ parameters).

Activations follow Megatron-LM's `compute_activation_memory` (Korthikanti et al. 2022, Table 2,
with the SwiGLU MLP's 4 x ffn / h): per layer s x b x h x (18 + 4 ffn/h) bytes at 2-byte activations,
all divided by TP under sequence parallelism; without it only 8 + 4 ffn/h of that is split
(Megatron's `compute_activation_memory_without_sp`: 10 + 24 / TP at ffn = 4h). Attention scores
are not counted by default: on a GPU the attention is Transformer Engine's flash / fused kernel,
which stores none, so selective recomputation saves nothing more here. With `flash_attention=False`
(Megatron's unfused DotProductAttention: the local spec, the CPU's) each layer also keeps its
scores, Korthikanti's 5 a s / h per sbh / TP (softmax output 2, dropout mask 1, dropout output 2
bytes per score at 2-byte activations), or 2 a s / h when attention_dropout is 0 (Llama, Qwen2:
torch's dropout then returns its input and only the softmax output is kept); selective
recomputation reruns exactly that core attention, so it keeps none. Measured on the CPU
(tests/unit/test_activation_memory.py, every saved storage of a real local-spec layer): the formula
with the scores is 61-68% of what the layer keeps, and the rest is, to the byte, kernels the CPU
does not fuse (RMSNorm's normalised input, the plain SwiGLU's two extra copies, the rotary tables,
the causal mask, QKV kept whole by the value view without GQA) plus two terms that also apply on a
GPU (not measured there): SwiGLU keeps fc1's 2 x ffn output and fc2's ffn input (6 ffn / h), where
the formula's 4 ffn / h (a GeLU MLP's count) covers the first only, and with dropout 0 the
formula's two residual dropout masks (2 sbh) do not exist. Full recomputation keeps each
group's input (2 s b h, / TP with SP) plus one group's activations while it is rerun. The first
stage holds PP micro-batches in flight (x Megatron's interleaving penalty with VPP), the last one
micro-batch of its layers plus the log-prob buffers: the model output's fp32 [tokens, V/TP] (the
log-prob's softmax and its gradient in place, loss/logprobs.py) and, for a 16-bit model, the 2-byte
logits before the upcast / the gradient after it.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from rift_megatron.config.runtime import engine_dtype, offload_switches
from rift_megatron.models.vocab import padded_vocab_size

if TYPE_CHECKING:
    from rift_megatron.config.schema import RiftConfig
    from rift_megatron.models.hf_config import ModelArchitecture

GIB = 2**30
# An H100 80 GB as torch.cuda.mem_get_info and vLLM see it (85,031,714,816 bytes; nvidia-smi says
# 81,559 MiB): what a run on one may plan with.
H100_80GB_GIB = 79.19
# CUDA context, NCCL communicators and what a sleeping vLLM keeps (CUDA graphs, its own non-pooled
# allocations), per GPU in every phase. An assumption (typical 2-4 GiB), NOT measured on a GPU.
CUDA_RESERVE_GIB = 3.0
# vLLM's profiled activation peak (max_num_batched_tokens through one forward pass plus the sampler's
# [max_num_seqs, vocab] fp32 buffers), inside its budget. An assumption, NOT measured on a GPU.
ENGINE_ACTIVATION_GIB = 2.0
# Prompt length assumed when the config has no rollout.max_model_len.
DEFAULT_PROMPT_TOKENS = 1024

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_ENGINE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The trainer state's parts by the offload switch that releases each (config.runtime.offload_switches).
_OFFLOADED_BY = {"weights": "params", "grads": "grads", "optimizer": "optimizer"}


@dataclass(frozen=True)
class Layout:
    """The parallel sizes the memory depends on (RiftConfig.parallel, plus DP from the world)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    context: int = 1
    data: int = 1


# ----------------------------------------------------------------------------- parameter counts


def layer_parameters(arch: ModelArchitecture, tensor: int) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank: the q/k/v and output
    projections, SwiGLU's fc1 (gate and up, 2 x ffn) and fc2 split over TP, q/k/v biases (Qwen2)
    split with their columns, the two RMSNorm weights replicated."""
    h, q = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    qkv = q + 2 * arch.num_kv_heads * arch.head_dim
    split = h * qkv + q * h + 3 * h * arch.ffn_hidden_size + (qkv if arch.qkv_bias else 0)
    return split // tensor + 2 * h


def stage_parameters(arch: ModelArchitecture, layout: Layout, stage: int) -> int:
    """Parameters one rank of pipeline stage `stage` holds (all its virtual chunks): its layers;
    on the first stage the embedding (padded vocabulary / TP x h); on the last the final norm and
    the output layer, which GPTModel builds there even with tied embeddings when PP > 1 (a copy
    kept equal to the embedding), and not at all with tied embeddings and PP = 1."""
    chunks = layout.virtual_pipeline or 1
    layers = arch.num_layers // (layout.pipeline * chunks) * chunks
    vocab_rows = padded_vocab_size(arch.vocab_size, layout.tensor) // layout.tensor * arch.hidden_size
    count = layers * layer_parameters(arch, layout.tensor)
    first, last = stage == 0, stage == layout.pipeline - 1
    if first:
        count += vocab_rows
    if last:
        count += arch.hidden_size + (0 if arch.tie_word_embeddings and first else vocab_rows)
    return count


# ------------------------------------------------------------------------------ training state


@dataclass(frozen=True)
class TrainerState:
    """Bytes of the trainer's state on one rank: the three parts the offload switches release."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def trainer_state(parameters: int, dtype: str, data_parallel: int, distributed_optimizer: bool) -> TrainerState:
    """Weights in `dtype`, the fp32 gradient buffer (grad_reduce_in_fp32), Adam's two fp32 moments
    plus fp32 main parameters for a 16-bit model, sharded over DP by the distributed optimizer."""
    weight_bytes = _DTYPE_BYTES[dtype]
    optimizer_bytes = 8 + (4 if weight_bytes < 4 else 0)
    optimizer = parameters * optimizer_bytes
    if distributed_optimizer:
        optimizer = -(-optimizer // data_parallel)
    return TrainerState(weights=parameters * weight_bytes, grads=parameters * 4, optimizer=optimizer)


# -------------------------------------------------------------------------------- activations


def attention_score_bytes(arch: ModelArchitecture, layout: Layout, tokens: int, sequence_length: int,
                          dtype: str) -> float:
    """What Megatron's unfused attention keeps per layer for one micro-batch of `tokens` tokens in
    rows of `sequence_length`: a x s x s x b scores on this rank's a / TP heads, each kept as the
    softmax output and, with attention dropout, its mask and output (Korthikanti et al. 2022:
    5 a s / h per sbh at 2-byte activations; 2 a s / h without dropout)."""
    kept = 5 if arch.attention_dropout > 0 else 2
    return tokens * sequence_length * arch.num_attention_heads / layout.tensor * _DTYPE_BYTES[dtype] / 2 * kept


def layer_activation_bytes(arch: ModelArchitecture, layout: Layout, tokens: int, recompute: str,
                           recompute_num_layers: int, layers: int, dtype: str, *, flash_attention: bool = True,
                           sequence_length: int | None = None) -> float:
    """Activations `layers` transformer layers keep for one micro-batch of `tokens` tokens
    (already divided by CP) on one rank: Megatron-LM's per-layer formula, or what full
    recomputation keeps instead. `flash_attention=False` (the unfused attention of the local
    spec) adds the attention scores of rows of `sequence_length` tokens (default: one row of
    `tokens`, the most for that many tokens), except under selective recomputation, which reruns
    them."""
    sbh = tokens * arch.hidden_size * _DTYPE_BYTES[dtype] / 2
    split = 8 + 4 * arch.ffn_hidden_size / arch.hidden_size
    tp = layout.tensor
    per_layer = sbh * (10 + split) / tp if layout.sequence_parallel else sbh * (10 + split / tp)
    if not flash_attention and recompute != "selective":
        per_layer += attention_score_bytes(arch, layout, tokens, sequence_length or tokens, dtype)
    if recompute != "full":
        return layers * per_layer
    group = min(recompute_num_layers, layers)
    stored_input = 2 * sbh / (tp if layout.sequence_parallel else 1)
    return math.ceil(layers / group) * stored_input + group * per_layer


def activation_bytes(arch: ModelArchitecture, layout: Layout, tokens: int, micro_batches: int, recompute: str,
                     recompute_num_layers: int, dtype: str, stage: int, *, flash_attention: bool = True,
                     sequence_length: int | None = None) -> float:
    """Activations stage `stage` holds at its peak: the 1F1B schedule keeps min(PP - stage,
    micro-batches) micro-batches in flight (Megatron's interleaving penalty with VPP, counted on
    every stage), each with the stage's layers; the first stage also the embedding's output.
    `flash_attention` and `sequence_length` as for `layer_activation_bytes`."""
    pp, chunks = layout.pipeline, layout.virtual_pipeline or 1
    in_flight = min(pp - stage, micro_batches)
    if chunks > 1:
        in_flight = pp * (1 + (pp - 1) / (pp * chunks))
    layers = arch.num_layers // pp
    total = in_flight * layer_activation_bytes(arch, layout, tokens, recompute, recompute_num_layers, layers, dtype,
                                               flash_attention=flash_attention, sequence_length=sequence_length)
    if stage == 0:  # token ids (8 B) and the embedding's output, per micro-batch in flight
        total += in_flight * tokens * (8 + arch.hidden_size * _DTYPE_BYTES[dtype] / 2) / layout.tensor
    return total


def logprob_buffer_bytes(arch: ModelArchitecture, layout: Layout, tokens: int, dtype: str) -> int:
    """The last stage's logits-sized buffers for one micro-batch: the fp32 output the log-probs
    work in place in (softmax, then its gradient), plus the 16-bit logits / gradient of a bf16 or
    fp16 model."""
    columns = padded_vocab_size(arch.vocab_size, layout.tensor) // layout.tensor
    return tokens * columns * (4 + (2 if _DTYPE_BYTES[dtype] == 2 else 0))


# ------------------------------------------------------------------------------------- engine


def kv_bytes_per_token(arch: ModelArchitecture, engine_tensor: int, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token on one engine rank (KV heads split over the engine's
    TP, replicated when TP exceeds them)."""
    heads = max(1, arch.num_kv_heads // engine_tensor)
    return 2 * arch.num_layers * heads * arch.head_dim * dtype_bytes


# ------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of one co-located rank (the most loaded one) in each phase."""

    gpu: int
    reserve: int
    # training phase (the engine asleep)
    trainer_weights: int
    trainer_grads: int
    trainer_optimizer: int
    activations: int
    logprob_buffers: int
    engine_while_training: int
    training_total: int
    # weight push (trainer resident, engine weights awake, one bucket)
    push_total: int
    # rollout phase
    trainer_resident: int
    engine_budget: int
    engine_weights: int
    engine_activations: int
    kv_cache: int
    kv_tokens: int
    rollout_total: int

    @property
    def trainer_state(self) -> int:
        return self.trainer_weights + self.trainer_grads + self.trainer_optimizer

    @property
    def training_headroom(self) -> int:
        return self.gpu - self.training_total

    @property
    def push_headroom(self) -> int:
        return self.gpu - self.push_total

    @property
    def rollout_headroom(self) -> int:
        return self.gpu - self.rollout_total

    def report(self) -> str:
        """One line per figure, in GiB (kv_tokens as a count)."""
        names = [f.name for f in fields(self)] + ["trainer_state", "training_headroom", "push_headroom",
                                                  "rollout_headroom"]
        return "\n".join(f"{name}: {getattr(self, name)}" if name == "kv_tokens"
                         else f"{name}: {getattr(self, name) / GIB:.2f} GiB" for name in names)


@dataclass(frozen=True)
class _Stage:
    state: TrainerState
    activations: int
    logprob_buffers: int
    resident: int  # of the trainer state, during the rollout


def layout_of(cfg: RiftConfig, world_size: int) -> Layout:
    """The config's parallel sizes; DP is what the world leaves (validate_for_world checks it divides)."""
    p = cfg.parallel
    return Layout(tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                  sequence_parallel=p.sequence_parallel, context=p.context,
                  data=world_size // (p.tensor * p.pipeline * p.context))


def tokens_per_micro_batch(cfg: RiftConfig, prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> int:
    """Tokens of the largest micro-batch: the packing budget, else micro_batch_size x the longest
    sample (rollout.max_model_len, else prompt_tokens + rollout.max_tokens)."""
    if cfg.training.max_tokens_per_micro_batch is not None:
        return cfg.training.max_tokens_per_micro_batch
    sample = cfg.rollout.max_model_len or prompt_tokens + cfg.rollout.max_tokens
    return cfg.training.micro_batch_size * sample


def estimate(cfg: RiftConfig, arch: ModelArchitecture, world_size: int, gpu_memory_gib: float = H100_80GB_GIB,
             prompt_tokens: int = DEFAULT_PROMPT_TOKENS, *, flash_attention: bool = True) -> MemoryEstimate:
    """Both phases' per-GPU figures of `cfg` on `world_size` GPUs of `gpu_memory_gib` each, on CUDA
    (offload switches left null count as on, their CUDA default). The most loaded pipeline stage
    decides each phase. `flash_attention=False`: Megatron's unfused attention (the local layer
    spec, without Transformer Engine) keeps each layer's attention scores, for rows of one sample
    (of the packing budget when packing)."""
    layout = layout_of(cfg, world_size)
    dtype, t = cfg.model.dtype, cfg.training
    tokens = -(-tokens_per_micro_batch(cfg, prompt_tokens) // layout.context)
    samples_per_rank = t.global_batch_size // layout.data
    micro_batches = max(1, samples_per_rank // t.micro_batch_size) if t.max_tokens_per_micro_batch is None \
        else layout.pipeline  # packing: assume the pipeline is full
    row = tokens_per_micro_batch(cfg, prompt_tokens) // (1 if t.max_tokens_per_micro_batch else t.micro_batch_size)
    gpu, reserve = int(gpu_memory_gib * GIB), int(CUDA_RESERVE_GIB * GIB)
    r = cfg.rollout
    engine_bytes = _ENGINE_DTYPE_BYTES[engine_dtype(cfg)]
    engine_weights = arch.num_parameters() * engine_bytes // r.engine_tensor_parallel
    engine_budget = int(r.gpu_memory_utilization * gpu)
    engine_activations = int(ENGINE_ACTIVATION_GIB * GIB)
    kv_cache = max(0, engine_budget - engine_weights - engine_activations)
    asleep = 0 if r.enable_sleep_mode else engine_budget
    switches = offload_switches(cfg, cuda=True)

    def stage_figures(stage: int) -> _Stage:
        state = trainer_state(stage_parameters(arch, layout, stage), dtype, layout.data,
                              cfg.optim.use_distributed_optimizer)
        acts = int(activation_bytes(arch, layout, tokens, micro_batches, t.recompute, t.recompute_num_layers,
                                    dtype, stage, flash_attention=flash_attention, sequence_length=row))
        logits = logprob_buffer_bytes(arch, layout, tokens, dtype) if stage == layout.pipeline - 1 else 0
        resident = sum(getattr(state, part) for part, switch in _OFFLOADED_BY.items() if not switches[switch])
        return _Stage(state, acts, logits, resident)

    stages = [stage_figures(stage) for stage in range(layout.pipeline)]
    training = max(stages, key=lambda s: s.state.total + s.activations + s.logprob_buffers)
    resident = max(s.resident for s in stages)
    return MemoryEstimate(
        gpu=gpu, reserve=reserve, trainer_weights=training.state.weights, trainer_grads=training.state.grads,
        trainer_optimizer=training.state.optimizer, activations=training.activations,
        logprob_buffers=training.logprob_buffers, engine_while_training=asleep,
        training_total=training.state.total + training.activations + training.logprob_buffers + asleep + reserve,
        push_total=max(s.state.total for s in stages) + engine_weights + r.sync_bucket_mb * 2**20 + reserve,
        trainer_resident=resident, engine_budget=engine_budget, engine_weights=engine_weights,
        engine_activations=engine_activations, kv_cache=kv_cache,
        kv_tokens=kv_cache // kv_bytes_per_token(arch, r.engine_tensor_parallel, engine_bytes),
        rollout_total=resident + engine_budget + reserve,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m rift_megatron.memory_model CONFIG --world N [--gpu-memory GIB] [--hf-config FILE]
    [--prompt-tokens N] [--unfused-attention]`."""
    from rift_megatron.config import ConfigError, load_config
    from rift_megatron.models.hf_config import ModelConfigError, load_hf_config

    parser = argparse.ArgumentParser(prog="python -m rift_megatron.memory_model", description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--world", type=int, required=True, help="number of GPUs (ranks)")
    parser.add_argument("--gpu-memory", type=float, default=H100_80GB_GIB, help="GiB per GPU (default: H100 80 GB)")
    parser.add_argument("--hf-config", help="the model's config.json (default: model.hf_dir's)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help="prompt length when rollout.max_model_len is null")
    parser.add_argument("--unfused-attention", action="store_true",
                        help="Megatron's unfused attention (local layer spec, no Transformer Engine): count the scores")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        arch = load_hf_config(args.hf_config or Path(cfg.model.hf_dir or "."))
    except (ConfigError, ModelConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    replica = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context
    if args.world < 1 or args.world % replica:
        print(f"error: --world {args.world} is not a positive multiple of parallel.tensor x pipeline x context "
              f"= {replica}", file=sys.stderr)
        return 2
    print(estimate(cfg, arch, args.world, args.gpu_memory, args.prompt_tokens,
                   flash_attention=not args.unfused_attention).report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

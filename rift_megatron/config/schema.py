"""The typed config tree of a training run: one frozen dataclass per section.

Every field carries its documentation in ``metadata["doc"]`` (shown by ``dump_yaml(cfg,
comments=True)``) and, where it has one, a numeric range (``min`` / ``gt`` / ``max`` / ``lt``)
that :func:`rift_megatron.config.checks.check_config` enforces. Types are the contract the
loader checks: ``int`` never accepts a bool, ``float`` accepts an int, ``X | None`` is the only
way to accept null, ``Literal[...]`` lists the allowed values.

Relative paths are relative to the working directory of the launching process, as in
Megatron-LM and torchtitan (not to the config file).

Nothing here imports torch or megatron: the config loads in milliseconds and is testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimSection",
    "ParallelConfig",
    "RiftConfig",
    "RolloutConfig",
    "TrainingConfig",
]


class ConfigError(ValueError):
    """A bad config: each line of the message names one key and what is wrong with it."""


def _f(default: Any, doc: str, **limits: float) -> Any:
    """A field with its user documentation and optional numeric limits (min, gt, max, lt)."""
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass(frozen=True)
class ModelConfig:
    """The model being fine-tuned."""

    hf_dir: str | None = _f(
        None,
        "Hugging Face model folder (config.json, tokenizer files, safetensors weights): the trainer reads "
        "the architecture and tokenizer here and the rollout engine starts from it. May be null when "
        "mcore_ckpt is set: then the checkpoint's hf_assets/ folder supplies config and tokenizer, and "
        "the engine starts without weights and receives the trainer's before its first rollout.",
    )
    mcore_ckpt: str | None = _f(
        None,
        "Megatron checkpoint with the initial weights (from `rift convert hf-to-mcore`, or a training "
        "checkpoint / run directory of an earlier run); null: the trainer converts hf_dir's weights on "
        "the fly. Any TP/PP layout loads.",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "Trainer parameter / compute dtype: fp32 (the CPU default), bf16 (GPU), fp16."
    )
    layer_impl: Literal["auto", "transformer_engine", "local"] = _f(
        "auto",
        "Transformer layers: transformer_engine (TE's fused kernels, GPU), local (Megatron-Core's pure "
        "PyTorch layers, any device); auto: TE when it is importable on a CUDA machine, else local (with a "
        "one-line notice on CUDA). Checkpoints are interchangeable between the two.",
    )


@dataclass(frozen=True)
class ParallelConfig:
    """Model parallelism; the data-parallel size is world_size / (tensor x pipeline x context)."""

    tensor: int = _f(1, "Tensor-parallel size (TP): splits every layer's weights over this many ranks.", min=1)
    pipeline: int = _f(1, "Pipeline-parallel size (PP): splits the layers into this many stages.", min=1)
    virtual_pipeline: int | None = _f(
        None, "Virtual pipeline stages per rank (interleaved schedule, needs pipeline >= 2); null: off.", min=2
    )
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tensor >= 2).")
    context: int = _f(
        1, "Context-parallel size (CP): splits every sequence over this many ranks (2 x CP load-balanced chunks); "
           "needs Transformer Engine attention (a CUDA GPU), so only 1 runs on the CPU.", min=1
    )
    overlap_grad_reduce: bool | None = _f(
        None, "Overlap the data-parallel gradient reduction with the backward pass (Megatron DDP); null: on with "
              "CUDA, off on the CPU.",
    )
    overlap_param_gather: bool | None = _f(
        None, "Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs "
              "optim.use_distributed_optimizer and overlap_grad_reduce); null: on with CUDA where those are on, off "
              "on the CPU.",
    )
    collective_timeout_minutes: float = _f(
        30.0, "Timeout of every training collective (NCCL / gloo); a rank that waits longer stops the run with a "
              "line naming the rank and the phase. Waiting for the slowest engine's rollout is not counted here: "
              "see rollout.wait_timeout_minutes.", gt=0
    )


@dataclass(frozen=True)
class OptimSection:
    """Adam and the learning-rate schedule; steps are optimizer steps (one per global batch)."""

    lr: float = _f(1e-5, "Peak learning rate.", gt=0)
    min_lr: float = _f(0.0, "Learning rate at the end of the decay (0 <= min_lr <= lr).", min=0)
    weight_decay: float = _f(0.0, "Decoupled weight decay.", min=0)
    adam_beta1: float = _f(0.9, "Adam beta1.", min=0, lt=1)
    adam_beta2: float = _f(0.999, "Adam beta2.", min=0, lt=1)
    adam_eps: float = _f(1e-8, "Adam epsilon.", gt=0)
    clip_grad: float = _f(1.0, "Global gradient-norm clipping threshold; 0 disables clipping.", min=0)
    lr_warmup_steps: int = _f(0, "Linear warm-up from 0 to lr over this many optimizer steps.", min=0)
    lr_decay_steps: int | None = _f(
        None, "Decay length in optimizer steps; null: training.steps (the whole run).", min=1
    )
    lr_decay_style: Literal["constant", "linear", "cosine"] = _f(
        "constant", "Shape of the decay from lr to min_lr after the warm-up."
    )
    use_distributed_optimizer: bool = _f(
        True, "Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."
    )


@dataclass(frozen=True)
class AlgorithmConfig:
    """The objective (see docs/objective.md) and the reward that feeds it."""

    name: Literal["rift", "rft", "sft", "naive"] = _f(
        "rift",
        "rift: reward-weighted NLL for r > 0, |r| * min(ratio, cap) for r < 0 (bounded); rft: NLL on "
        "correct samples only; sft: NLL on every sample; naive: -r * logprob for all (unbounded, ablation).",
    )
    ratio_cap: float | None = _f(
        None, "Cap C on the importance ratio of negative samples; null: no cap.", gt=0
    )
    granularity: Literal["token", "sequence"] = _f(
        "token", "Negative-branch ratio per token, or one length-normalised ratio per sequence."
    )
    normalization: Literal["global", "per_sign"] = _f(
        "global",
        "global: divide by all non-zero-reward tokens of the global batch (the paper's expectation); "
        "per_sign: average positives and negatives separately, then add.",
    )
    r_pos: float = _f(1.0, "Reward of a sample the verifier accepts.")
    r_neg: float = _f(-0.2, "Reward of a sample the verifier rejects.")
    reward: str = _f(
        "math",
        "Verifier: 'math' (symbolic answer check), 'exact' (normalised string match), or a "
        "function 'pkg.module:name' taking (prompt, response, answer) -> bool | float.",
    )
    reward_timeout_s: float = _f(5.0, "Wall-clock limit per verification, in seconds.", gt=0)
    reward_workers: int = _f(2, "Verifier worker processes per rank.", min=1)
    reward_memory_limit_mb: int | None = _f(
        4096, "Address-space cap of each verifier worker in MiB; null: no cap.", min=256
    )


@dataclass(frozen=True)
class DataConfig:
    """Where the training samples come from."""

    mode: Literal["online", "offline"] = _f(
        "online",
        "online: sample from `prompts` with the co-located engine every step; offline: train on a "
        "scored buffer written by `rift rollout` (the paper's setting).",
    )
    prompts: str | None = _f(None, "Prompt file (JSONL or Parquet) for online mode.")
    buffer: str | None = _f(None, "Buffer directory (rollout.parquet + manifest.json) for offline mode.")
    prompt_field: str = _f("prompt", "Field / column holding the prompt text.")
    answer_field: str = _f("answer", "Field / column holding the reference answer for the verifier.")
    chat_template: bool = _f(False, "Wrap prompts in the tokenizer's chat template.")
    prompts_per_step: int = _f(
        8, "Online: prompts per rollout batch (each sampled rollout.k times).", min=1
    )
    shuffle: bool = _f(True, "Reshuffle prompts (or buffer samples) every epoch, seeded by training.seed.")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling and the co-located vLLM engine (online mode; `k` and sampling also for eval defaults)."""

    k: int = _f(8, "Samples per prompt.", min=1)
    temperature: float = _f(1.0, "Sampling temperature (0: greedy).", min=0)
    top_p: float = _f(1.0, "Nucleus sampling threshold, in (0, 1].", gt=0, max=1)
    top_k: int = _f(-1, "Top-k sampling; -1: off.", min=-1)
    max_tokens: int = _f(256, "Maximum response length in tokens.", min=1)
    stop: tuple[str, ...] = _f((), "Stop strings (the response ends before them).")
    engine_tensor_parallel: int = _f(
        1, "Tensor-parallel size of each engine; one engine per this many consecutive ranks.", min=1
    )
    engine_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto",
        "vLLM weight dtype; auto: the trainer's (model.dtype), so behaviour log-probs are computed at the "
        "trainer's precision (a coarser engine loosens the sync check to the bf16 tolerance).",
    )
    gpu_memory_utilization: float = _f(
        0.5, "Fraction of GPU memory vLLM may use (weights + KV cache), in (0, 1].", gt=0, max=1
    )
    max_model_len: int | None = _f(
        None, "Engine context length; null: longest prompt + max_tokens.", min=1
    )
    cpu_kv_cache_gib: float = _f(
        1.0, "KV cache size of each engine on CPU, in GiB (fractions allowed: a tiny model's engine needs a few "
             "MiB, and the whole cache is resident in every rank's memory).", gt=0
    )
    wait_timeout_minutes: float = _f(
        240.0, "How long ranks whose engines finished a rollout wait for the slowest one (in a CPU gloo group of "
               "its own, outside the training collectives and their parallel.collective_timeout_minutes).", gt=0
    )
    enable_sleep_mode: bool = _f(
        True, "Release engine memory while training: a level-2 sleep (weights and KV cache discarded; the next "
              "push restores the weights). GPU only; bookkeeping only on CPU."
    )
    param_offload: bool | None = _f(
        None, "Move the trainer's parameters (Megatron DDP's parameter buffers) to host memory while the engine "
              "generates, and back before training; null: on with CUDA, off on CPU (host to host there)."
    )
    grad_offload: bool | None = _f(
        None, "Free the trainer's gradient buffers while the engine generates (they hold nothing between steps; "
              "re-zeroed before training); null: on with CUDA, off on CPU."
    )
    optimizer_offload: bool | None = _f(
        None, "Move the optimizer state (Adam moments, fp32 main parameters of a bf16 model) to host memory while "
              "the engine generates; null: on with CUDA, off on CPU."
    )
    sync_bucket_mb: int = _f(
        256,
        "Trainer -> engine weight push bucket size in MiB (peak extra memory). Buckets are cut only between "
        "whole transformer layers, so a layer larger than this is pushed alone.",
        min=1,
    )
    sync_path: Literal["auto", "gather"] = _f(
        "auto",
        "How weights reach the engine. auto: when engine_tensor_parallel equals parallel.tensor, each rank converts "
        "its own tensor-parallel shard into its engine worker's and receives only other pipeline stages' shards "
        "(about model bytes / TP per rank; verified on the CPU, not verified on a GPU), otherwise the gather path; "
        "gather: every rank gathers and receives the whole model (the fallback, any layout).",
    )
    sync_check: bool = _f(
        True,
        "Check every weight push: the first optimizer step after it compares the trainer's log-probs of the "
        "rollout's sampled tokens with the engine's and stops the run (before the weights move) when they differ.",
    )
    sync_check_atol: float | None = _f(
        None,
        "sync_check tolerance on the MEAN |trainer - engine| log-prob over the sampled response tokens (the max "
        "is logged as logprob_diff_max); null: the per-dtype default, calibrated on kernel noise "
        "(model.dtype fp32: 2e-4, bf16/fp16: 0.1; measured noise on SmolLM2-135M: 9e-6 and 0.04).",
        gt=0,
    )


@dataclass(frozen=True)
class TrainingConfig:
    """Length of the run and batch sizes (in samples: one sample = one prompt + one response)."""

    steps: int = _f(100, "Optimizer steps in total (the LR schedule counts these).", min=1)
    epochs_per_rollout: int = _f(
        1, "Online: passes over each rollout batch (prompts_per_step x k samples) before the next rollout.", min=1
    )
    global_batch_size: int = _f(64, "Samples per optimizer step, over all data-parallel ranks.", min=1)
    micro_batch_size: int = _f(4, "Samples per forward/backward pass on one rank.", min=1)
    max_tokens_per_micro_batch: int | None = _f(
        None,
        "Pack micro-batches by length instead: samples sorted by length are cut into consecutive runs "
        "whose samples x longest sample (in tokens, padding included) stay within this budget (a longer "
        "sample goes alone), the cut with the least padding plus a fixed cost per micro-batch; each "
        "micro-batch is padded only to its own longest sample and micro_batch_size is unused. Loss and "
        "gradients are those of the unpacked batch. Not with parallel.virtual_pipeline. null: "
        "micro_batch_size samples per micro-batch, all padded to the rank's longest sample.",
        min=1,
    )
    seed: int = _f(1234, "Seed of model init, data order, sampling and dropout.", min=0)
    recompute: Literal["none", "selective", "full"] = _f(
        "none",
        "Activation recomputation (saves memory, costs compute; same math): selective recomputes the core "
        "attention in the backward pass, full reruns whole transformer layers (see recompute_method).",
    )
    recompute_method: Literal["uniform", "block"] = _f(
        "uniform",
        "recompute full: uniform stores the input of every group of recompute_num_layers layers and reruns the "
        "group; block reruns the first recompute_num_layers layers of each pipeline stage and stores the rest.",
    )
    recompute_num_layers: int = _f(
        1, "recompute full: layers per group (uniform) or per stage (block); at most the layers of one stage.", min=1
    )
    max_consecutive_nonfinite: int = _f(
        3, "A step whose gradients are not finite is skipped (weights unchanged, logged as nonfinite=1); "
           "this many in a row stop the run (after saving the last good weights when checkpoint.dir is set).", min=1
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints (model, optimizer, scheduler, sampler and RNG state, this config)."""

    dir: str | None = _f(None, "Checkpoint directory; null: no checkpoints are written.")
    interval: int = _f(0, "Save every this many optimizer steps; 0: only at the end (when dir is set).", min=0)
    keep_last: int | None = _f(3, "Keep the newest N checkpoints; null: keep all.", min=1)
    resume: str = _f(
        "auto", "auto: continue from the latest checkpoint in dir if any; none: start fresh; or a checkpoint path."
    )
    async_save: Literal["auto", True, False] = _f(
        "auto",
        "Write checkpoints in the background (Megatron-Core's async save): the tensors are staged in host memory "
        "and a forked process writes them while training goes on; the checkpoint becomes `latest` only after "
        "every rank's write completed (checked each step). auto: on with CUDA, off on the CPU.",
    )
    fully_parallel_save: bool = _f(
        True, "Spread the writing of replicated tensors over the data-parallel ranks (Megatron-Core's fully "
              "parallel save) instead of leaving it to data-parallel rank 0.",
    )
    fully_parallel_load: bool = _f(
        True, "Each data-parallel rank reads a share of the replicated tensors and the ranks exchange them "
              "(Megatron-Core's fully parallel load), instead of every rank reading all it needs.",
    )
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = _f(
        "fully_reshardable",
        "Distributed-optimizer state on disk. fully_reshardable: per parameter, in the model's sharding, so a run "
        "resumes at any tensor / pipeline / data-parallel layout (each save gathers a model-parallel shard's "
        "optimizer state, 12 bytes per parameter, over the data-parallel group into host memory). dp_reshardable: "
        "each rank's flat buffers, no gather; resumes at another data-parallel size only.",
    )


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation (accuracy / pass@k of the current policy)."""

    prompts: str | None = _f(None, "Held-out prompt file (same fields as data); null: no evaluation.")
    interval: int = _f(0, "Evaluate every this many optimizer steps; 0: only at the start and end.", min=0)
    k: int = _f(1, "Samples per prompt (pass@k is reported for this k).", min=1)
    temperature: float = _f(0.0, "Sampling temperature (0: greedy).", min=0)
    max_tokens: int | None = _f(None, "Maximum response length; null: rollout.max_tokens.", min=1)
    stop_at_accuracy: float | None = _f(
        None,
        "Stop training early once a periodic evaluation's accuracy reaches this value (e.g. a warm-up "
        "to a target level, chosen on a validation file); null: train to training.steps.",
        min=0, max=1,
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics output."""

    dir: str = _f("runs/latest", "Run directory: metrics, TensorBoard events, the resolved config.")
    tensorboard: bool = _f(True, "Write TensorBoard event files under dir.")
    wandb: bool = _f(False, "Log to Weights & Biases (needs `wandb` installed and logged in).")
    wandb_project: str = _f("rift-megatron", "W&B project name.")
    wandb_run_name: str | None = _f(None, "W&B run name; null: W&B picks one.")
    log_interval: int = _f(
        1, "Print the console line every this many optimizer steps (metrics.jsonl, TensorBoard and W&B get every step).", min=1
    )


@dataclass(frozen=True)
class RiftConfig:
    """A whole training run. ``load_config`` builds it from YAML plus ``key.sub=value`` overrides."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": ModelConfig.__doc__})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": ParallelConfig.__doc__})
    optim: OptimSection = field(default_factory=OptimSection, metadata={"doc": OptimSection.__doc__})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata={"doc": AlgorithmConfig.__doc__})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": DataConfig.__doc__})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": RolloutConfig.__doc__})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"doc": TrainingConfig.__doc__})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": CheckpointConfig.__doc__})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": EvalConfig.__doc__})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": LoggingConfig.__doc__})

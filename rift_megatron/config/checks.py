"""Value checks of a built config: ranges, cross-field rules, and the checks against the world.

Two stages, because they need different things:

* :func:`check_config` needs only the config (ranges from the schema's field metadata, rules
  between fields); ``load_config`` runs it, so a config that loads is internally consistent.
* :func:`validate_for_world` needs the launch: the world size (divisibility of parallel sizes and
  batch sizes) and the file system (model, data, eval and resume paths). The trainer runs it on
  every rank before touching torch.distributed, so a bad launch fails in a second, not after the
  model is built.

Every message is one line that starts with the key it is about.
"""

from __future__ import annotations

import difflib
import importlib.util
import operator
import re
from collections.abc import Iterator, Mapping
from dataclasses import Field, fields, is_dataclass
from pathlib import Path
from typing import Any

from rift_megatron.hf_folder import folder_problem

from .schema import ConfigError, RiftConfig

__all__ = ["check_config", "iter_leaves", "response_lengths", "validate_for_world", "where"]

# Name of the buffer file `rift rollout` writes (rift_megatron.rollout.buffer.BUFFER_FILE; not
# imported so this module stays free of the rollout package's dependencies).
BUFFER_FILE = "rollout.parquet"

_LIMITS = {"min": (">=", operator.ge), "gt": (">", operator.gt), "max": ("<=", operator.le), "lt": ("<", operator.lt)}
_REWARD_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_BUILTIN_REWARDS = ("math", "exact")


def where(path: str, sources: Mapping[str, str]) -> str:
    """`` (in cfg.yaml, line 3)`` for the key or its nearest ancestor with a known source, else ''."""
    while path:
        if path in sources:
            return f" ({sources[path]})"
        path = path.rpartition(".")[0]
    return ""


def iter_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Field, Any]]:
    """``(dotted path, dataclass field, value)`` of every non-section field, in schema order."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from iter_leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_problem(path: str, f: Field, value: Any) -> str | None:
    if isinstance(value, str) and not value:
        return "must not be empty"
    if isinstance(value, tuple) and any(not item for item in value):
        return f"must not contain empty strings, got {list(value)!r}"
    if value is None or isinstance(value, (bool, str, tuple)):
        return None
    for limit, (symbol, ok) in _LIMITS.items():
        bound = f.metadata.get(limit)
        if bound is not None and not ok(value, bound):
            return f"must be {symbol} {_num(bound)}, got {_num(value)}"
    return None


def _cross_field_problems(cfg: RiftConfig) -> Iterator[tuple[str, str]]:
    """``(key, what is wrong)`` for every rule between fields that ``cfg`` breaks."""
    par, opt, alg, data, ro, ckpt, ev = (
        cfg.parallel, cfg.optim, cfg.algorithm, cfg.data, cfg.rollout, cfg.checkpoint, cfg.eval
    )
    if par.sequence_parallel and par.tensor < 2:
        yield "parallel.sequence_parallel", f"needs parallel.tensor >= 2, got parallel.tensor = {par.tensor}"
    if par.virtual_pipeline is not None and par.pipeline < 2:
        yield "parallel.virtual_pipeline", f"needs parallel.pipeline >= 2, got parallel.pipeline = {par.pipeline}"
    if par.overlap_param_gather and not opt.use_distributed_optimizer:
        yield "parallel.overlap_param_gather", "needs optim.use_distributed_optimizer: true"
    if par.overlap_param_gather and par.overlap_grad_reduce is False:
        yield "parallel.overlap_param_gather", "needs parallel.overlap_grad_reduce (true or null)"
    if cfg.training.max_tokens_per_micro_batch is not None and par.virtual_pipeline is not None:
        yield "training.max_tokens_per_micro_batch", (
            "does not work with parallel.virtual_pipeline (Megatron-Core 0.16.1's interleaved schedule "
            "mixes up micro-batches of different shapes): set one of them to null"
        )
    if opt.min_lr > opt.lr:
        yield "optim.min_lr", f"must be <= optim.lr ({_num(opt.lr)}), got {_num(opt.min_lr)}"
    if opt.lr_decay_steps is not None and opt.lr_warmup_steps >= opt.lr_decay_steps:
        yield "optim.lr_warmup_steps", f"must be < optim.lr_decay_steps ({opt.lr_decay_steps}), got {opt.lr_warmup_steps}"
    if alg.reward not in _BUILTIN_REWARDS and not _REWARD_FUNCTION.match(alg.reward):
        close = difflib.get_close_matches(alg.reward, _BUILTIN_REWARDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        yield "algorithm.reward", (
            f"must be 'math', 'exact' or a function path 'pkg.module:name', got {alg.reward!r}{hint}"
        )
    if data.prompt_field == data.answer_field:
        yield "data.answer_field", f"must differ from data.prompt_field, both are {data.prompt_field!r}"
    if ro.top_k == 0:
        yield "rollout.top_k", "must be -1 (off) or >= 1, got 0"
    if ckpt.interval > 0 and ckpt.dir is None:
        yield "checkpoint.interval", f"is {ckpt.interval} but checkpoint.dir is null: set checkpoint.dir to save checkpoints"
    if ev.interval > 0 and ev.prompts is None:
        yield "eval.interval", f"is {ev.interval} but eval.prompts is null: set eval.prompts to evaluate"
    if ev.stop_at_accuracy is not None and ev.interval == 0:
        yield "eval.stop_at_accuracy", "needs periodic evaluations: set eval.interval > 0 (and eval.prompts)"
    if ev.k > 1 and ev.temperature == 0:
        yield "eval.k", f"is {ev.k} but eval.temperature is 0 (greedy): the samples would be identical"


def check_config(cfg: RiftConfig, sources: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first value out of range or rule between fields broken.

    ``sources`` maps dotted keys to where they were set (``in cfg.yaml, line 3``) for the message.
    """
    sources = sources or {}
    for path, f, value in iter_leaves(cfg):
        problem = _range_problem(path, f, value)
        if problem:
            raise ConfigError(f"config key {path!r}{where(path, sources)} {problem}")
    for path, problem in _cross_field_problems(cfg):
        raise ConfigError(f"config key {path!r}{where(path, sources)} {problem}")


def _checkpoint_problems(mcore: str, needs_hf_assets: bool) -> Iterator[str]:
    """`model.mcore_ckpt` must name a checkpoint (or a run directory whose `latest` does); without
    `model.hf_dir` it must also carry hf_assets/ (config + tokenizer)."""
    if not Path(mcore).exists():
        yield f"model.mcore_ckpt {mcore!r} does not exist"
        return
    from rift_megatron.convert.checkpoint_files import find_hf_assets, resolve_checkpoint
    from rift_megatron.convert.errors import ConversionError

    try:
        checkpoint = resolve_checkpoint(mcore)
        if needs_hf_assets:
            assets = find_hf_assets(checkpoint)
            if problem := folder_problem(assets):
                yield f"model.mcore_ckpt: its {str(assets)!r} {problem} (or set model.hf_dir)"
    except ConversionError as error:
        yield f"model.mcore_ckpt: {error}" + (" (or set model.hf_dir)" if needs_hf_assets else "")


def _path_problems(cfg: RiftConfig) -> Iterator[str]:
    hf, mcore = cfg.model.hf_dir, cfg.model.mcore_ckpt
    if hf is None and mcore is None:
        yield ("model.hf_dir and model.mcore_ckpt are both null: set model.hf_dir (a Hugging Face model folder) "
               "or model.mcore_ckpt (a Megatron checkpoint with hf_assets/)")
    elif hf is not None and (problem := folder_problem(hf, weights=mcore is None)):
        # safetensors weights are converted when no checkpoint is given; a tokenizer is always read
        yield f"model.hf_dir {hf!r} {problem}"
    if mcore is not None:
        yield from _checkpoint_problems(mcore, needs_hf_assets=hf is None)
    data = cfg.data
    if data.mode == "online":
        if data.prompts is None:
            yield "data.prompts is not set (a JSONL or Parquet prompt file is needed for data.mode 'online')"
        elif not Path(data.prompts).is_file():
            yield f"data.prompts {data.prompts!r} " + (
                "is not a file" if Path(data.prompts).exists() else "does not exist"
            )
    else:
        if data.buffer is None:
            yield "data.buffer is not set (a buffer directory from `rift rollout` is needed for data.mode 'offline')"
        elif not Path(data.buffer).is_dir():
            yield f"data.buffer {data.buffer!r} " + (
                "is not a directory" if Path(data.buffer).exists() else "does not exist"
            )
        elif not (Path(data.buffer) / BUFFER_FILE).is_file():
            yield f"data.buffer {data.buffer!r} has no {BUFFER_FILE} (write one with `rift rollout`)"
    if cfg.eval.prompts is not None and not Path(cfg.eval.prompts).is_file():
        yield f"eval.prompts {cfg.eval.prompts!r} " + (
            "is not a file" if Path(cfg.eval.prompts).exists() else "does not exist"
        )
    if cfg.model.layer_impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        yield ("model.layer_impl is 'transformer_engine' but Transformer Engine is not installed "
               "(install the gpu extra: docs/gpu_install.md, or use 'auto' / 'local')")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        yield f"checkpoint.resume {resume!r} does not exist (use 'auto', 'none' or an existing checkpoint)"


def _model_problems(cfg: RiftConfig) -> Iterator[str]:
    """The model (its config.json, whose folder is known to be sound) against the parallel
    layout and the rollout / evaluation lengths; the same checks the trainer and the engine
    would fail later, in a line naming the key."""
    from rift_megatron.data.lengths import LengthError, length_budget
    from rift_megatron.models.hf_config import ModelConfigError, load_hf_config
    from rift_megatron.models.provider import validate_layout

    from .runtime import model_folder, to_parallel_layout

    folder = model_folder(cfg)
    try:
        validate_layout(load_hf_config(folder), to_parallel_layout(cfg))
    except ModelConfigError as error:
        yield (f"parallel.tensor ({cfg.parallel.tensor}) / parallel.pipeline ({cfg.parallel.pipeline}) do not fit "
               f"the model: {error}")
    else:
        yield from _recompute_problems(cfg, load_hf_config(folder).num_layers)
    try:
        for max_tokens, name, used in response_lengths(cfg):
            if used:
                length_budget(folder, max_tokens, name, max_model_len=cfg.rollout.max_model_len,
                              max_model_len_name="rollout.max_model_len")
    except LengthError as error:
        yield str(error)


def _recompute_problems(cfg: RiftConfig, num_layers: int) -> Iterator[str]:
    """Full recomputation groups layers within one model chunk (a pipeline stage, or a virtual one)."""
    chunks = cfg.parallel.pipeline * (cfg.parallel.virtual_pipeline or 1)
    per_chunk = num_layers // chunks
    if cfg.training.recompute == "full" and cfg.training.recompute_num_layers > per_chunk:
        yield (f"training.recompute_num_layers ({cfg.training.recompute_num_layers}) is more than the {per_chunk} "
               f"layers of one model chunk ({num_layers} layers / {chunks} pipeline chunks)")


def response_lengths(cfg: RiftConfig) -> list[tuple[int, str, bool]]:
    """(max tokens, the key that sets it, whether the run samples with it) for rollouts and for
    evaluations; eval.max_tokens null means rollout.max_tokens."""
    rollout = (cfg.rollout.max_tokens, "rollout.max_tokens", cfg.data.mode == "online")
    evaluation = (cfg.eval.max_tokens, "eval.max_tokens") if cfg.eval.max_tokens else rollout[:2]
    return [rollout, (*evaluation, cfg.eval.prompts is not None)]


def world_problems(cfg: RiftConfig, world_size: int) -> Iterator[str]:
    """The config's sizes against `world_size` ranks, one line each: model-parallel sizes that do not
    divide the world, batches that do not split over micro-batches x data-parallel ranks, rollouts over
    engines and global batches (no files read: the planner checks its candidate layouts with it)."""
    tp, pp, cp = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context
    gbs, mbs = cfg.training.global_batch_size, cfg.training.micro_batch_size
    dp = None
    if world_size % (tp * pp * cp):
        yield (
            f"parallel.tensor ({tp}) x parallel.pipeline ({pp}) x parallel.context ({cp}) = {tp * pp * cp} does not "
            f"divide the world size {world_size}"
        )
    else:
        dp = world_size // (tp * pp * cp)
        if cfg.training.max_tokens_per_micro_batch is not None:
            if gbs % dp:
                yield f"training.global_batch_size ({gbs}) is not divisible by the data-parallel size ({dp})"
        elif gbs % (mbs * dp):
            yield (
                f"training.global_batch_size ({gbs}) is not divisible by training.micro_batch_size ({mbs}) "
                f"x data-parallel size ({dp}) = {mbs * dp}"
            )
    if cfg.data.mode != "online":
        return
    prompts, k, etp = cfg.data.prompts_per_step, cfg.rollout.k, cfg.rollout.engine_tensor_parallel
    if world_size % etp:
        yield f"rollout.engine_tensor_parallel ({etp}) does not divide the world size {world_size}"
    elif prompts % (world_size // etp):
        engines = world_size // etp
        yield (
            f"data.prompts_per_step ({prompts}) is not divisible by the number of rollout engines {engines} "
            f"(world size {world_size} / rollout.engine_tensor_parallel {etp})"
        )
    samples = prompts * k
    if dp is not None and samples % dp:
        yield (
            f"data.prompts_per_step ({prompts}) x rollout.k ({k}) = {samples} is not divisible by the "
            f"data-parallel size {dp}"
        )
    elif samples % gbs:
        yield (
            f"data.prompts_per_step ({prompts}) x rollout.k ({k}) = {samples} samples per rollout is not "
            f"divisible by training.global_batch_size ({gbs})"
        )


def _context_problems(cfg: RiftConfig) -> Iterator[str]:
    """Context parallelism against the layer implementation this machine resolves to."""
    if cfg.parallel.context == 1:
        return
    from rift_megatron.models.provider import context_parallel_problem
    from rift_megatron.platform import resolve_layer_impl
    from rift_megatron.platform.device import LayerImplError

    from .runtime import to_parallel_layout

    try:
        layer_impl = resolve_layer_impl(cfg.model.layer_impl)
    except LayerImplError:
        layer_impl = None  # reported on its own by _path_problems / at model build
    problem = context_parallel_problem(to_parallel_layout(cfg), layer_impl)
    if problem:
        yield problem


def validate_for_world(cfg: RiftConfig, world_size: int) -> int:
    """Check ``cfg`` against a launch of ``world_size`` processes and the file system.

    Returns the data-parallel size. Raises :class:`ConfigError` listing every problem found, one
    line each: model-parallel sizes (TP x PP x CP) that do not divide the world, context
    parallelism without Transformer Engine attention, batch sizes that do not split
    over micro-batches x data-parallel ranks (or a rollout batch over global batches and rollout
    engines), a missing model folder / config.json / tokenizer / safetensors weights / checkpoint /
    prompt file / buffer; once the files are sound, a model the parallel sizes cannot split (heads,
    KV heads, FFN, layers) and response lengths that leave no room in the context.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    problems = [*world_problems(cfg, world_size), *_context_problems(cfg), *_path_problems(cfg)]
    if not problems:  # the model's files are sound: check the model against the layout and lengths
        problems = list(_model_problems(cfg))
    if problems:
        raise ConfigError("\n".join(problems))
    return world_size // (cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context)

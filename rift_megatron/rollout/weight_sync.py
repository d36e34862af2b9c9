"""Push the trainer's weights into the co-located vLLM engine after every optimizer step.

Nothing touches disk. Two paths (`push_path`). When the trainer's and the engine's tensor-parallel
sizes are equal, each rank converts its own shard into its worker's and receives only the shards
of other pipeline stages (`shard_push.py`: about model bytes / TP per rank). Otherwise (the
gather path), per parameter, in one order every rank agrees on:
  1. the pipeline stage that owns it gathers its tensor-parallel shards into the full TP1
     Megatron tensor (SwiGLU shards are re-interleaved into [gate; up]);
  2. that stage broadcasts it to the other stages' ranks (the pipeline group), so every rank,
     and so every rank's vLLM worker, holds it;
  3. the conversion table (`convert/mapping.py`, the same one checkpoint conversion uses) splits
     it into HF-named tensors (QKV and gate/up split, vocabulary padding stripped);
Either way:
  4. HF tensors are collected into buckets of about `bucket_bytes`, cut only between whole
     transformer layers (vLLM must receive a fused layer's parts in one call), and loaded
     through the workers' in-place `reload_weights` path.
Then the prefix cache is reset (cached KV from the old weights would otherwise be reused). Whether
the push landed is judged on the next rollout's sampled tokens: the trainer recomputes their
log-probs in its first step anyway, and `check_mismatch` compares the two before the optimizer
moves (`logprob_mismatch` / the step's `logprob_diff_mean`). Peak extra memory: one bucket (at
least one layer) plus one full parameter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rift_megatron.convert.mapping import expand
from rift_megatron.models.hf_config import ModelArchitecture
from rift_megatron.models.param_names import named_checkpoint_parameters
from rift_megatron.platform import current_platform
from rift_megatron.rollout.engine import RolloutEngine
from rift_megatron.rollout.errors import WeightSyncError
from rift_megatron.rollout.shard_push import Traffic, sharded_hf_weights

_HF_LAYER = re.compile(r"^model\.layers\.\d+\.")

@dataclass(frozen=True)
class SyncStats:
    """One push: `bytes` handed to the engine (HF-shaped tensors), `received_bytes` this rank
    received from other ranks to build them, and which path (`engine_weights`) made them."""

    seconds: float
    bytes: int
    tensors: int
    buckets: int
    received_bytes: int = 0
    path: str = "gather"


def _local_params(chunks: list[torch.nn.Module], wanted: set[str]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by checkpoint name (TE and local models alike); a tied output_layer
    copy on the last stage is not in the table and is left out."""
    return {name: param for name, param in named_checkpoint_parameters(chunks).items() if name in wanted}


def gather_tensor_parallel(param: torch.nn.Parameter, name: str, tp_group, data: torch.Tensor | None = None,
                           traffic: Traffic | None = None) -> torch.Tensor:
    """The full TP1 tensor of a tensor-parallel parameter (or the parameter itself); `data`: a
    tensor sharded like `param` to gather instead (e.g. its gradient); `traffic` counts the
    bytes received from the other ranks."""
    from megatron.core import parallel_state as ps

    data = param.detach() if data is None else data.detach()
    size = ps.get_tensor_model_parallel_world_size()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return data
    shards = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(shards, data.contiguous(), group=tp_group)
    if traffic is not None:
        traffic.received += (size - 1) * data.numel() * data.element_size()
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        # Each rank holds [gate_r; up_r]; the TP1 layout is [gate_0 .. gate_n; up_0 .. up_n].
        halves = [shard.chunk(2, dim=dim) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


@dataclass(frozen=True)
class Owner:
    """Where a parameter lives: its pipeline stage, full (TP1) shape, dtype and TP split
    dimension (None: replicated across the TP group)."""

    stage: int
    shape: tuple
    dtype: torch.dtype
    partition_dim: int | None


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _ownership(local: dict[str, torch.nn.Parameter], order: list[str], pp_group) -> dict[str, Owner]:
    """name -> Owner for every name of `order` that some stage holds, the same on every rank: one
    small integer tensor per stage, all-gathered over the pipeline group (no pickling)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    # per name: held, TP split dim (-1: replicated), dtype index, full shape (ndim <= 2, 0-padded)
    mine = torch.zeros((len(order), 5), dtype=torch.int64)
    for row, name in enumerate(order):
        param = local.get(name)
        if param is None:
            continue
        shape, split = list(param.shape), -1
        if getattr(param, "tensor_model_parallel", False):
            split = param.partition_dim
            shape[split] *= tp
        mine[row] = torch.tensor([1, split, _DTYPES.index(param.dtype), *shape, *[0] * (2 - len(shape))])
    device = current_platform().device()
    everyone = [torch.empty_like(mine, device=device) for _ in range(dist.get_world_size(pp_group))]
    dist.all_gather(everyone, mine.to(device), group=pp_group)
    owned: dict[str, Owner] = {}
    for stage, table in enumerate(t.cpu() for t in everyone):
        for name, (held, split, dtype, *shape) in zip(order, table.tolist()):
            if held and name not in owned:
                owned[name] = Owner(stage, tuple(d for d in shape if d), _DTYPES[dtype], None if split < 0 else split)
    return owned


def _owned_params(chunks: list[torch.nn.Module], arch: ModelArchitecture) -> tuple[dict, dict[str, Owner]]:
    """This rank's mapped parameters and every parameter's owner (collective over the pipeline group)."""
    from megatron.core import parallel_state as ps

    order = [m.megatron for m in expand(arch)]
    local = _local_params(chunks, set(order))
    owners = _ownership(local, order, ps.get_pipeline_model_parallel_group())
    missing = [name for name in order if name not in owners]
    if missing:
        raise WeightSyncError(f"no pipeline stage holds {missing[:3]} (model and conversion table disagree)")
    return local, owners


def full_megatron_params(chunks: list[torch.nn.Module], arch: ModelArchitecture,
                         traffic: Traffic | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(TP1 Megatron name, full tensor) for every mapped parameter, on every rank, in table order."""
    from megatron.core import parallel_state as ps

    local, owners = _owned_params(chunks, arch)
    pp_group, tp_group = ps.get_pipeline_model_parallel_group(), ps.get_tensor_model_parallel_group()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    my_pp_rank = ps.get_pipeline_model_parallel_rank()
    for mapping in expand(arch):
        name, owner = mapping.megatron, owners[mapping.megatron]
        full = gather_tensor_parallel(local[name], name, tp_group, traffic=traffic) if owner.stage == my_pp_rank else None
        if pp_size > 1:
            if full is None:
                full = torch.empty(owner.shape, dtype=owner.dtype, device=current_platform().device())
            src = dist.get_global_rank(pp_group, owner.stage)
            dist.broadcast(full.contiguous() if owner.stage == my_pp_rank else full, src=src, group=pp_group)
            if owner.stage != my_pp_rank and traffic is not None:
                traffic.add(full)
        yield name, full


def hf_weights(chunks: list[torch.nn.Module], arch: ModelArchitecture,
               traffic: Traffic | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named full tensors of the trainer's current weights (collective over the model group)."""
    by_param = {m.megatron: m for m in expand(arch)}
    for name, full in full_megatron_params(chunks, arch, traffic):
        mapping = by_param[name]
        yield from zip(mapping.hf, mapping.to_hf(full, arch))


def push_path(requested: str, engine_tensor_parallel: int) -> str:
    """The push path for this layout: "shard" when the trainer's and the engine's tensor-parallel
    slices coincide (`shard_push`: each rank receives about model bytes / TP), else "gather"
    (every rank receives the whole model). `requested`: "auto", "shard" or "gather"."""
    possible = uses_shard_path(engine_tensor_parallel)
    if requested == "shard" and not possible:
        raise WeightSyncError(f"the shard push needs the engine's tensor-parallel ranks to be the trainer's "
                              f"(engine TP {engine_tensor_parallel})")
    if requested == "auto":
        return "shard" if possible else "gather"
    return requested


def engine_weights(chunks: list[torch.nn.Module], arch: ModelArchitecture, path: str,
                   traffic: Traffic) -> Iterator[tuple[str, torch.Tensor]]:
    """What this rank's engine worker loads, HF-named and HF-shaped, by `path` (from `push_path`;
    collective over the model group)."""
    if path == "gather":
        return hf_weights(chunks, arch, traffic)
    local, owners = _owned_params(chunks, arch)
    return sharded_hf_weights(local, owners, arch, traffic)


def uses_shard_path(engine_tensor_parallel: int) -> bool:
    """True when every rank's engine worker holds the trainer's own TP slice: equal TP sizes and
    the engine's rank within its engine (global rank mod engine TP) equal to Megatron's TP rank."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank() if dist.is_initialized() else 0
    return (ps.get_tensor_model_parallel_world_size() == engine_tensor_parallel
            and ps.get_tensor_model_parallel_rank() == rank % engine_tensor_parallel)


def reload_unit(hf_name: str) -> str:
    """The group of HF tensors that must reach vLLM in one reload call.

    vLLM 0.32's in-place reload finalises, at the end of every `reload_weights` call, each layer
    it received part of, rebuilding the missing part from uninitialised memory: q/k/v of one
    attention (vLLM's fused `qkv_proj`) or gate/up (`gate_up_proj`) split across calls corrupt
    the engine. A whole transformer layer (`model.layers.N`) is a superset of every fused vLLM
    layer in it; the embedding, final norm and LM head are single tensors.
    """
    match = _HF_LAYER.match(hf_name)
    return match.group(0) if match else hf_name


def buckets(weights: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of about `bucket_bytes`, cut only between reload units (whole
    layers): a unit larger than the bucket goes alone, so the peak is max(bucket, one layer)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    unit: list[tuple[str, torch.Tensor]] = []
    unit_name, unit_size = None, 0
    for name, tensor in [*weights, (None, None)]:
        this_unit = reload_unit(name) if name is not None else None
        if unit and this_unit != unit_name:  # the previous unit is complete
            if bucket and size + unit_size > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.extend(unit)
            size += unit_size
            unit, unit_size = [], 0
        if name is None:
            break
        unit_name = this_unit
        unit.append((name, tensor))
        unit_size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket


def push_weights(
    engine: RolloutEngine, chunks: list[torch.nn.Module], arch: ModelArchitecture, bucket_bytes: int = 256 * 2**20,
    path: str = "auto",
) -> SyncStats:
    """Collective over the trainer's world: every rank streams the weights into its engine
    (`path`: see `push_path`). Wakes the engine's weights only: its KV cache wakes when generation
    needs it (`training/handoff.py`), after the trainer has offloaded."""
    start = time.perf_counter()
    engine.wake_up(["weights"])
    path = push_path(path, engine.config.tensor_parallel_size)
    traffic = Traffic()
    total_bytes = tensors = count = 0
    for bucket in buckets(engine_weights(chunks, arch, path, traffic), bucket_bytes):
        engine.load_weights(bucket)
        total_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        tensors += len(bucket)
        count += 1
    expected = sum(len(m.hf) for m in expand(arch))
    if tensors != expected:
        raise WeightSyncError(f"pushed {tensors} tensors, the model has {expected}")
    engine.reset_prefix_cache()
    return SyncStats(seconds=time.perf_counter() - start, bytes=total_bytes, tensors=tensors, buckets=count,
                     received_bytes=traffic.received, path=path)


@dataclass(frozen=True)
class LogprobMismatch:
    """Trainer vs engine log-probs of the same sampled tokens, under the same weights.

    `mean` (mean |difference|) is what the sync check judges: kernel noise is many small
    differences of both signs, while a stale or corrupt push shifts many tokens at once, so the
    mean separates them where a single maximum cannot (at 70B in bf16 the maximum of kernel noise
    alone approaches 0.1). `max` is logged; `mult_error` is NeMo-RL's token multiplicative
    probability error, mean(exp|difference|) (1.0 = identical).
    """

    mean: float
    max: float
    mult_error: float
    tokens: int


def logprob_mismatch(trainer: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> LogprobMismatch:
    """Statistics over the positions where `mask` is set (float64, on the CPU)."""
    used = mask.detach().cpu() != 0
    diff = (trainer.detach().cpu().double() - engine.detach().cpu().double()).abs()[used]
    if diff.numel() == 0:
        return LogprobMismatch(mean=0.0, max=0.0, mult_error=1.0, tokens=0)
    return LogprobMismatch(mean=float(diff.mean()), max=float(diff.max()), mult_error=float(diff.exp().mean()),
                           tokens=int(diff.numel()))


def probe_mismatch(
    engine: RolloutEngine, trainer_logprobs: torch.Tensor, probe: torch.Tensor, mask: torch.Tensor | None = None
) -> LogprobMismatch:
    """The engine's log-probs of `probe` ([B, S] token ids, positions 1..S-1) against the
    trainer's (`trainer_logprobs`, [B, S-1]) where `mask` ([B, S-1]; default: everywhere) is set."""
    engine_logprobs = torch.tensor(engine.prompt_logprobs(probe.tolist()), dtype=torch.float64)
    return logprob_mismatch(trainer_logprobs, engine_logprobs, torch.ones_like(engine_logprobs) if mask is None else mask)


def check_mismatch(mismatch: LogprobMismatch, tolerance: float, where: str) -> None:
    """Raise WeightSyncError (one line) when the mean mismatch exceeds `tolerance`."""
    if mismatch.tokens and not mismatch.mean <= tolerance:
        raise WeightSyncError(
            f"{where}: trainer and engine log-probs of {mismatch.tokens} sampled tokens differ by {mismatch.mean:.3g} "
            f"on average (max {mismatch.max:.3g}; tolerance {tolerance:g}, rollout.sync_check_atol): the engine does "
            "not hold the trainer's weights"
        )

"""One gloo process of tests/distributed/test_vocab_parallel_logprobs.py.

Each rank takes its vocabulary slice of deterministic logits (the same ones the pytest process
builds for the TP1 reference), runs ``vocab_parallel_logprobs`` (copying, and in place on an fp32
upcast as the trainer does) / the Megatron ``loss_func`` over a real tensor-parallel group, and
saves its outputs and gradient slices to ``rank{r}.pt``; the assertions happen in the pytest
process. Every ``torch.distributed`` collective is wrapped by a counting spy (it calls the real
collective: instrumentation, not a mock) to prove the vocabulary is never gathered. World 2 also
runs the loss_func at context parallelism 2 (CP group = world).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from rift_megatron.loss import (
    LossSettings,
    count_sign_tokens,
    make_loss_func,
    reduce_loss_reports,
    vocab_parallel_logprobs,
)
from rift_megatron.parallel import ParallelLayout
from rift_megatron.training.batch import pad_sequences
from rift_megatron.training.context_parallel import context_parallel_positions, context_parallel_share

BATCH, STEPS = 4, 5
VOCAB_SIZES = (11, 9)  # neither divisible by 2 or 4; at TP4, 9 leaves rank 3 with padding only
DTYPES = (torch.float32, torch.bfloat16)
LOSS_VOCAB = 11
LOSS_SETTINGS = (
    LossSettings(),
    LossSettings(ratio_cap=1.5, granularity="sequence", normalization="per_sign"),
    LossSettings(algorithm="naive", ratio_cap=1.2),
)
# Context parallelism at CP2 (world 2): token / sequence granularity x global / per_sign normalisation.
CP_SETTINGS = (
    LossSettings(),
    LossSettings(normalization="per_sign"),
    LossSettings(granularity="sequence"),
    LossSettings(ratio_cap=1.5, granularity="sequence", normalization="per_sign"),
)
CP_LAYOUT = ParallelLayout(context=2)
CP_DTYPES = (torch.float64, torch.float32)
PADDING_VALUE = 1e4  # huge: any leak of the padding into the softmax would be obvious
GATHER_LIKE = (
    "all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object", "all_gather_coalesced",
    "gather", "gather_object", "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list",
    "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
)
SPIED = GATHER_LIKE + ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor")


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp


def make_logits_case(vocab: int, tp: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full padded logits ``[B, S, padded]``, targets covering the first and last real ids, grad_out."""
    g = torch.Generator().manual_seed(1000 + vocab)
    real = 3.0 * torch.randn(BATCH, STEPS, vocab, generator=g)
    targets = torch.randint(0, vocab, (BATCH, STEPS), generator=g)
    targets[0, 0], targets[0, 1] = vocab - 1, 0
    grad_out = torch.randn(BATCH, STEPS, generator=g)
    pad = torch.full((BATCH, STEPS, padded_vocab(vocab, tp) - vocab), PADDING_VALUE)
    return torch.cat([real, pad], dim=-1).to(dtype), targets, grad_out


def make_loss_case(tp: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Full padded fp32 logits and a batch with mixed rewards, masks and behaviour log-probs."""
    g = torch.Generator().manual_seed(7)
    real = 2.0 * torch.randn(BATCH, STEPS, LOSS_VOCAB, generator=g)
    targets = torch.randint(0, LOSS_VOCAB, (BATCH, STEPS), generator=g)
    behavior = torch.log_softmax(real.double(), -1).gather(-1, targets[..., None]).squeeze(-1).float()
    behavior = behavior + 0.5 * torch.randn(BATCH, STEPS, generator=g)
    mask = torch.ones(BATCH, STEPS, dtype=torch.long)
    mask[:, 0] = 0  # prompt
    mask[1, -2:] = 0  # padding
    batch = dict(
        targets=targets,
        loss_mask=mask,
        rewards=torch.tensor([1.0, -0.2, -1.0, 0.5]),
        behavior_logprobs=behavior,
    )
    pad = torch.full((BATCH, STEPS, padded_vocab(LOSS_VOCAB, tp) - LOSS_VOCAB), PADDING_VALUE)
    return torch.cat([real, pad], dim=-1), batch


def make_cp_case(dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [B, 6, V] and a training batch whose response tokens (positions 1..5) fall into both CP2 ranks'
    chunks once padded to 8 positions (rank 0: 0, 1, 6, 7; rank 1: 2..5), so a sequence's ratio
    needs both ranks. Sample 3 has a single response token, which lies on rank 0."""
    g = torch.Generator().manual_seed(11)
    steps = 6
    logits = (2.0 * torch.randn(BATCH, steps, LOSS_VOCAB, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, LOSS_VOCAB, (BATCH, steps), generator=g)
    behavior = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    behavior = (behavior + 1.5 * torch.randn(BATCH, steps, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.ones(BATCH, steps, dtype=torch.long)
    mask[:, 0] = 0
    mask[1, -1] = 0
    mask[3, 2:] = 0
    batch = dict(tokens=torch.roll(targets, 1, dims=1), position_ids=torch.arange(steps).expand(BATCH, steps),
                 targets=targets, loss_mask=mask, rewards=torch.tensor([1.0, -0.2, -1.0, -0.5]),
                 behavior_logprobs=behavior)
    return logits, batch


def pad_cp_case(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The case padded as the trainer pads it for CP2; padded logits are garbage (PADDING_VALUE)."""
    padded = pad_sequences(batch, CP_LAYOUT.sequence_multiple)
    extra = padded["targets"].shape[1] - logits.shape[1]
    garbage = torch.full((BATCH, extra, logits.shape[2]), PADDING_VALUE, dtype=logits.dtype)
    return torch.cat([logits, garbage], dim=1), padded


class CollectiveSpy:
    """Counts calls (and the largest all_reduce) of torch.distributed collectives, then calls them."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.max_all_reduce_numel = 0
        for name in SPIED:
            real = getattr(dist, name)
            wrapped = self._wrap(name, real)
            setattr(dist, name, wrapped)  # torch.distributed.<name>
            setattr(c10d, name, wrapped)  # and the module that defines it

    def _wrap(self, name: str, real: Any) -> Any:
        @functools.wraps(real)
        def spy(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            self.total[name] += 1
            if name == "all_reduce":
                self.max_all_reduce_numel = max(self.max_all_reduce_numel, args[0].numel())
            return real(*args, **kwargs)

        return spy

    def take(self) -> dict[str, Any]:
        """Calls since the last take()."""
        out = {"calls": dict(self.calls), "max_all_reduce_numel": self.max_all_reduce_numel}
        self.calls.clear()
        self.max_all_reduce_numel = 0
        return out


def _tp_configs(rank: int, world_size: int, groups: dict[str, Any]) -> list[tuple[int, Any, int]]:
    """(tp size, tp group, tp rank) of every tensor-parallel layout this rank takes part in."""
    configs = [(world_size, groups["world"], rank)]
    if world_size == 4:
        configs.append((2, groups["tp"], rank % 2))
    return configs


def _run_logprobs(results: dict, spy: CollectiveSpy, configs: list[tuple[int, Any, int]]) -> None:
    for tp, group, tp_rank in configs:
        for vocab in VOCAB_SIZES:
            for dtype in DTYPES:
                logits, targets, grad_out = make_logits_case(vocab, tp, dtype)
                local_vocab = logits.shape[-1] // tp
                local = logits[..., tp_rank * local_vocab:(tp_rank + 1) * local_vocab].clone().requires_grad_()
                before = local.detach().clone()
                spy.take()
                lp = vocab_parallel_logprobs(local, targets, vocab_size=vocab, tp_group=group)
                lp.backward(grad_out)
                key = f"tp{tp}/v{vocab}/{str(dtype).split('.')[-1]}"
                results[f"logprobs/{key}"] = lp.detach()
                results[f"grad/{key}"] = local.grad
                results[f"input_unchanged/{key}"] = bool(torch.equal(local.detach(), before))
                results[f"spy/{key}"] = spy.take()
                # the trainer's path: a fresh fp32 model output consumed in place (for bf16, the
                # `.float()` that Float16Module's float16_to_fp32 applies; not imported: 2.5 s a worker)
                leaf = before.clone().requires_grad_()
                lp_inplace = vocab_parallel_logprobs(leaf.float() if dtype == torch.bfloat16 else leaf * 1,
                                                     targets, vocab_size=vocab, tp_group=group, inplace=True)
                lp_inplace.backward(grad_out)
                results[f"inplace_identical/{key}"] = bool(
                    torch.equal(lp_inplace, lp.detach()) and torch.equal(leaf.grad, local.grad))
                results[f"spy/inplace/{key}"] = spy.take()


def _run_loss_func(results: dict, spy: CollectiveSpy, configs: list[tuple[int, Any, int]]) -> None:
    for tp, group, tp_rank in configs:
        logits, batch = make_loss_case(tp)
        local_vocab = logits.shape[-1] // tp
        for i, settings in enumerate(LOSS_SETTINGS):
            counts = None
            if settings.normalization == "per_sign":
                counts = count_sign_tokens(batch["rewards"], batch["loss_mask"], algorithm=settings.algorithm)
            local = logits[..., tp_rank * local_vocab:(tp_rank + 1) * local_vocab].clone().requires_grad_()
            spy.take()
            loss_func = make_loss_func(batch, settings, vocab_size=LOSS_VOCAB, tp_group=group, sign_token_counts=counts)
            loss_sum, num_tokens, report = loss_func(local)
            (loss_sum / num_tokens).backward()
            key = f"tp{tp}/s{i}"
            results[f"loss_sum/{key}"] = loss_sum.detach()
            results[f"num_tokens/{key}"] = num_tokens
            results[f"loss_grad/{key}"] = local.grad
            results[f"metrics/{key}"] = reduce_loss_reports([report])
            results[f"spy/loss/{key}"] = spy.take()


def _run_dp_tp(results: dict, rank: int, groups: dict[str, Any]) -> None:
    """DP2 x TP2: each data-parallel rank takes half the batch in two micro-batches, sums, and
    divides by the DP-all-reduced token count, as Megatron's schedule + finalize_model_grads do."""
    dp_rank, tp_rank = rank // 2, rank % 2
    logits, batch = make_loss_case(2)
    local_vocab = logits.shape[-1] // 2
    shard = torch.arange(BATCH).chunk(2)[dp_rank]
    for i, settings in enumerate(LOSS_SETTINGS):
        counts = None
        if settings.normalization == "per_sign":  # the trainer's once-per-step global counts
            local_counts = torch.stack(count_sign_tokens(batch["rewards"][shard], batch["loss_mask"][shard],
                                                         algorithm=settings.algorithm))
            dist.all_reduce(local_counts, group=groups["dp"])
            counts = (local_counts[0], local_counts[1])
        local = logits[shard][..., tp_rank * local_vocab:(tp_rank + 1) * local_vocab].clone().requires_grad_()
        loss_total, tokens_total, reports = 0, torch.zeros((), dtype=torch.int64), []
        for rows in torch.arange(len(shard)).chunk(2):
            micro = {k: v[shard][rows] for k, v in batch.items()}
            loss_func = make_loss_func(micro, settings, vocab_size=LOSS_VOCAB, tp_group=groups["tp"],
                                       sign_token_counts=counts)
            loss_sum, num_tokens, report = loss_func(local[rows])
            loss_total = loss_total + loss_sum
            tokens_total = tokens_total + num_tokens
            reports.append(report)
        loss_total.backward()
        dist.all_reduce(tokens_total, group=groups["dp"])  # finalize_model_grads
        loss_value = loss_total.detach().clone()
        dist.all_reduce(loss_value, group=groups["dp"])
        key = f"dp2tp2/s{i}"
        results[f"loss/{key}"] = loss_value / tokens_total
        results[f"loss_grad/{key}"] = local.grad / tokens_total
        results[f"rows/{key}"] = shard
        results[f"metrics/{key}"] = reduce_loss_reports(reports, group=groups["dp"])


def _run_context_parallel(results: dict, rank: int, group: Any) -> None:
    """CP2: each rank takes its load-balanced share of the padded sequences (and of the same full
    logits), runs the loss_func with the CP group, and divides by the token count all-reduced over
    the group, as finalize_model_grads does over data parallel x CP. Megatron's own split of the
    same batch is compared with ours."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    for dtype in CP_DTYPES:
        logits, batch = pad_cp_case(*make_cp_case(dtype))
        positions = context_parallel_positions(logits.shape[1], CP_LAYOUT.context, rank)
        share = context_parallel_share(batch, CP_LAYOUT.context, rank)
        per_token = {k: v.clone() for k, v in batch.items() if k != "rewards"}
        megatron_share = get_batch_on_this_cp_rank(per_token, cp_group=group)
        name = str(dtype).split(".")[-1]
        results[f"cp/same_split_as_megatron/{name}"] = all(torch.equal(megatron_share[k], share[k]) for k in per_token)
        results[f"cp/positions/{name}"] = positions
        for i, settings in enumerate(CP_SETTINGS):
            counts = None
            if settings.normalization == "per_sign":  # on whole sequences, before the split (train_step)
                counts = count_sign_tokens(batch["rewards"], batch["loss_mask"], algorithm=settings.algorithm)
            local = logits[:, positions].clone().requires_grad_()
            loss_func = make_loss_func(share, settings, vocab_size=LOSS_VOCAB, sign_token_counts=counts, cp_group=group)
            loss_sum, num_tokens, report = loss_func(local)
            tokens = num_tokens.clone()
            dist.all_reduce(tokens, group=group)
            (loss_sum / tokens).backward()
            key = f"{name}/s{i}"
            results[f"cp/loss/{key}"] = _cp_total(loss_sum, group) / tokens
            results[f"cp/grad/{key}"] = local.grad
            results[f"cp/metrics/{key}"] = reduce_loss_reports([report], group=group)
            if settings.granularity == "sequence":  # the same without the CP reduction: a wrong loss
                alone, _, _ = make_loss_func(share, settings, vocab_size=LOSS_VOCAB, sign_token_counts=counts)(local)
                results[f"cp/loss_without_cp_reduction/{key}"] = _cp_total(alone, group) / tokens


def _megatron_cp_group(results: dict) -> Any:
    """Megatron's groups as `init_model_parallel` makes them for CP2 on 2 processes: one CP group of
    both ranks, DP 1, and the data-parallel-with-CP group (DDP's gradient and token reduction) of 2."""
    from megatron.core import parallel_state as ps

    from rift_megatron.parallel import init_model_parallel

    init_model_parallel(CP_LAYOUT, seed=None)
    results["cp/sizes"] = (ps.get_context_parallel_world_size(), ps.get_data_parallel_world_size(),
                           ps.get_data_parallel_world_size(with_context_parallel=True))
    return ps.get_context_parallel_group()


def _cp_total(value: torch.Tensor, group: Any) -> torch.Tensor:
    total = value.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Entry point for torch.multiprocessing.spawn."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        groups = {"world": dist.new_group(list(range(world_size)))}
        if world_size == 4:  # every rank must create every group, in the same order
            tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
            groups["tp"], groups["dp"] = tp_groups[rank // 2], dp_groups[rank % 2]
        spy = CollectiveSpy()
        results: dict[str, Any] = {"rank": rank, "world_size": world_size}
        configs = _tp_configs(rank, world_size, groups)
        _run_logprobs(results, spy, configs)
        _run_loss_func(results, spy, configs)
        if world_size == 4:
            _run_dp_tp(results, rank, groups)
        else:
            _run_context_parallel(results, rank, _megatron_cp_group(results))
        results["spy_total"] = dict(spy.total)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

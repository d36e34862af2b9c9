"""One optimizer step of the RIFT family on Megatron-Core (any TP / PP / VPP / CP / DP layout).

The shape is Megatron-LM's `train_step`: zero the grad buffers, run `forward_backward_func` over
the micro-batches with our `forward_step(data_iterator, model)`, step the optimizer and the LR
scheduler. What is RIFT-specific: the global token counts are computed once before the schedule
runs (so the loss does not depend on how the batch is split), and the per-step metrics are the
loss parts a RIFT user wants to watch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist

from rift_megatron.loss import LossSettings, count_sign_tokens, make_loss_func, reduce_loss_reports
from rift_megatron.parallel import all_reduce_sum
from rift_megatron.platform import current_platform
from rift_megatron.training.batch import TrainBatch, pad_sequences, split_micro_batches, validate_batch
from rift_megatron.training.context_parallel import context_parallel_share
from rift_megatron.training.packing import packed_micro_batches, sample_lengths
from rift_megatron.training.setup import TrainState

# Called with the step's reduced metrics (identical on every rank) before the optimizer steps;
# raising there stops every rank before the weights move (e.g. a failed weight-sync check).
MetricsCheck = Callable[[dict[str, float]], None]


def global_sign_token_counts(batch: Mapping[str, torch.Tensor], settings: LossSettings, dp_group) -> tuple[int, int]:
    """(Z_pos, Z_neg) of the whole global batch: this rank's counts summed over data parallel.

    Counted on whole sequences, before the context-parallel split, so summing over the
    data-parallel group alone counts each token once (the CP ranks of one DP rank share its batch)."""
    counts = torch.stack(
        count_sign_tokens(batch["rewards"], batch["loss_mask"], algorithm=settings.algorithm)
    ).to(torch.int64)
    all_reduce_sum(counts, group=dp_group)
    return int(counts[0]), int(counts[1])


def _broadcast_from_last_stage(metrics: dict[str, float] | None) -> dict[str, float]:
    """Give every pipeline stage the metrics only the last stage computed (for logging anywhere)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    holder = [metrics]
    dist.broadcast_object_list(
        holder, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
    )
    return holder[0]


def prepare_batch(batch: Mapping[str, torch.Tensor], state: TrainState) -> TrainBatch:
    """Where a batch enters the trainer (Megatron-LM's `get_batch`): rows padded to the length
    the layout needs (sequence parallelism), then moved once to this process's device."""
    validate_batch(batch)
    return current_platform().to_device(pad_sequences(batch, state.provider.layout.sequence_multiple))


def micro_batches_of(batch: TrainBatch, state: TrainState, micro_batch_size: int,
                     max_tokens_per_micro_batch: int | None) -> list[TrainBatch]:
    """A prepared batch cut for the schedule: `micro_batch_size` samples each, or packed by length
    into `max_tokens_per_micro_batch` padded tokens each (training/packing.py; not with virtual
    pipeline stages, whose schedule mixes up differently shaped micro-batches)."""
    if max_tokens_per_micro_batch is None:
        return split_micro_batches(batch, micro_batch_size)
    layout = state.provider.layout
    if layout.virtual_pipeline:
        raise ValueError("packed micro-batches (max_tokens_per_micro_batch) do not work with virtual pipeline stages")
    return packed_micro_batches(batch, max_tokens_per_micro_batch, multiple=layout.sequence_multiple)


@contextmanager
def _shapes_exchanged(state: TrainState, micro_batches: list[TrainBatch]):
    """Megatron's pipeline sends activations of one fixed [seq, batch, hidden] shape unless
    `variable_seq_lengths` is set, which makes every send announce its shape first (an extra small
    message per send). Set it for the schedules whose micro-batches differ in shape, and only then."""
    from megatron.core.utils import get_model_config

    config = get_model_config(state.model[0])
    varies = len({tuple(mb["tokens"].shape) for mb in micro_batches}) > 1
    before = config.variable_seq_lengths
    config.variable_seq_lengths = before or (varies and state.provider.layout.pipeline > 1)
    try:
        yield
    finally:
        config.variable_seq_lengths = before


def padding_fraction(batch: TrainBatch, micro_batches: list[TrainBatch], dp_group) -> float:
    """The share of the positions the step computes on that are padding, over the global batch."""
    real = float(sum(sample_lengths(batch)))
    computed = float(sum(mb["tokens"].numel() for mb in micro_batches))
    totals = torch.tensor([real, computed], dtype=torch.float64, device=batch["tokens"].device)
    all_reduce_sum(totals, group=dp_group)
    return 1.0 - float(totals[0] / totals[1])


def train_step(
    state: TrainState,
    batch: TrainBatch,
    settings: LossSettings,
    micro_batch_size: int,
    check: MetricsCheck | None = None,
    max_tokens_per_micro_batch: int | None = None,
) -> dict[str, float]:
    """Train on this data-parallel rank's share `batch` of the global batch; return step metrics.

    A global batch with no loss tokens (e.g. every reward 0 under rift) carries no signal, and a
    non-finite gradient anywhere carries garbage: in both cases the optimizer step is skipped
    (Adam would otherwise still move the weights with its momentum) and `skipped` is 1 in the
    metrics (`nonfinite` 1 for the second). `check`, if given, sees the forward/backward metrics
    before the optimizer step and may raise to stop the step on every rank. With
    `max_tokens_per_micro_batch` the micro-batches are packed by length (`micro_batch_size` is then
    unused); `pad_fraction` in the metrics is the share of computed positions that were padding.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = prepare_batch(batch, state)
    micro_batches = micro_batches_of(batch, state, micro_batch_size, max_tokens_per_micro_batch)
    dp_group = ps.get_data_parallel_group()
    tp_group = ps.get_tensor_model_parallel_group()
    counts = global_sign_token_counts(batch, settings, dp_group)
    padding = padding_fraction(batch, micro_batches, dp_group)
    # Megatron is told each micro-batch's whole sequence length (it divides by CP itself); this
    # rank computes on its context-parallel share of each.
    first_batch, first_seq = micro_batches[0]["tokens"].shape  # the shape used when all are alike
    cp_size = ps.get_context_parallel_world_size()
    cp_group = ps.get_context_parallel_group() if cp_size > 1 else None
    micro_batches = [context_parallel_share(mb, cp_size, ps.get_context_parallel_rank()) for mb in micro_batches]
    sign_counts = counts if settings.normalization == "per_sign" else None
    vocab_size = state.provider.arch.vocab_size

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        output = model(micro_batch["tokens"], micro_batch["position_ids"], None)
        # The schedule hands `output` to loss_func and drops it: the loss may work in its buffer.
        loss_func = make_loss_func(
            micro_batch, settings, vocab_size=vocab_size, tp_group=tp_group, sign_token_counts=sign_counts,
            cp_group=cp_group,
            consume_logits=True,
        )
        return output, loss_func

    iterators = [iter(micro_batches) for _ in state.model]
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    with _shapes_exchanged(state, micro_batches):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=state.model if len(state.model) > 1 else state.model[0],
            num_microbatches=len(micro_batches),
            seq_length=first_seq,
            micro_batch_size=first_batch,
            forward_only=False,
        )
    report_group = ps.get_data_parallel_group(with_context_parallel=True)  # every token's report once
    metrics = reduce_loss_reports(reports, group=report_group) if ps.is_pipeline_last_stage() else None
    metrics = dict(_broadcast_from_last_stage(metrics))
    if check is not None:
        check(metrics)
    nonfinite = not gradients_finite(state)
    skipped = sum(counts) == 0 or nonfinite
    grad_norm = 0.0
    if not skipped:
        update_successful, grad_norm, _ = state.optimizer.step()
        skipped = not update_successful
        if update_successful:
            state.scheduler.step(increment=1)
    state.step += 1
    metrics.update(
        step=state.step,
        grad_norm=float(grad_norm or 0.0),
        lr=float(state.optimizer.param_groups[0]["lr"]),
        skipped=float(skipped),
        nonfinite=float(nonfinite),
        pad_fraction=padding,
    )
    return metrics


def gradients_finite(state: TrainState) -> bool:
    """Whether every gradient of the step is finite, the same answer on every rank.

    Megatron's own NaN check (DDP's `check_for_nan_in_grad`) stops the job; a RIFT run instead
    skips the step (the weights and the optimizer state stay as they were) and the loop stops only
    after `training.max_consecutive_nonfinite` skips in a row. Each rank checks its whole gradient
    buffers (its own contribution: a NaN anywhere in the global gradient came from some rank's
    local one) and the verdict is reduced over the world, so every rank skips together.
    """
    local_bad = any(
        not bool(torch.isfinite(buffer.grad_data).all())
        for chunk in state.model for buffer in chunk.buffers + chunk.expert_parallel_buffers
    )
    flag = torch.tensor([1.0 if local_bad else 0.0], device=current_platform().device())
    all_reduce_sum(flag)
    return float(flag.item()) == 0.0

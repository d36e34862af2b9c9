"""Forward-only passes through the Megatron model (any TP / PP / VPP layout).

Used to recompute log-probs with the trainer's weights (the weight-sync check, behaviour
log-probs for buffers sampled elsewhere) and by `rift convert verify`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from rift_megatron.loss import vocab_parallel_logprobs
from rift_megatron.platform import current_platform


def _sequence_multiple(model: list) -> int:
    """What the sequence length must be a multiple of for this model (sequence parallelism)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    return ps.get_tensor_model_parallel_world_size() if get_model_config(model[0]).sequence_parallel else 1


def forward_only(model: list, tokens: torch.Tensor, collect: Callable[[torch.Tensor], dict]) -> dict | None:
    """Run `tokens` ([B, S], one micro-batch) through Megatron's forward-only schedule.

    Returns `collect(output)` on the last pipeline stage (output: [B, S, vocab/TP] logits), None
    on the other stages. The tokens are moved to this process's device and, under sequence
    parallelism, right-padded to a multiple of the TP size; the logits of the padding are cut off
    before `collect` sees them (causal attention: padding at the end changes nothing before it).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if ps.get_context_parallel_world_size() > 1:
        raise NotImplementedError(
            "forward-only passes (the offline weight-push probe, `rift convert verify`) do not split the sequence "
            "over context-parallel ranks: not implemented for parallel.context > 1"
        )
    batch, seq = tokens.shape
    padded = seq + (-seq % _sequence_multiple(model))
    tokens = torch.nn.functional.pad(tokens, (0, padded - seq)).to(current_platform().device())
    positions = torch.arange(padded, device=tokens.device).expand(batch, padded)

    def forward_step(data_iterator, chunk):
        output = chunk(next(data_iterator), positions, None)
        return output, lambda logits: (torch.zeros((), device=logits.device), collect(logits[:, :seq]))

    was_training = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=[iter([tokens]) for _ in model] if len(model) > 1 else iter([tokens]),
                model=model if len(model) > 1 else model[0],
                num_microbatches=1,
                seq_length=padded,
                micro_batch_size=batch,
                forward_only=True,
            )
    finally:
        for chunk, training in zip(model, was_training):
            chunk.train(training)
    return outputs[0] if ps.is_pipeline_last_stage() else None


def sequence_logprobs(model: list, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) for t >= 1, float32 [B, S-1], on every rank.

    Computed from vocab-parallel logits without gathering the vocabulary, then broadcast from
    the last pipeline stage so every rank can use it.
    """
    from megatron.core import parallel_state as ps

    tokens = tokens.to(current_platform().device())
    tp_group = ps.get_tensor_model_parallel_group()
    result = forward_only(
        model,
        tokens,
        lambda logits: {  # nothing else reads these logits: work in their buffer, no fp32 copy
            "logprobs": vocab_parallel_logprobs(
                logits[:, :-1], tokens[:, 1:], vocab_size=vocab_size, tp_group=tp_group, inplace=True
            )
        },
    )
    logprobs = (result["logprobs"] if result is not None
                else torch.empty(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float32, device=tokens.device))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(logprobs, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return logprobs

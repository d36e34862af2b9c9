"""The RIFT family of objectives (see docs/objective.md).

- :func:`vocab_parallel_logprobs`: per-token log-probs from vocab-parallel logits, no vocab gather;
- :func:`rift_token_loss`: the objective on plain ``[batch, seq]`` tensors, as (loss_sum, num_tokens);
- :func:`make_loss_func` / :func:`reduce_loss_reports`: the Megatron-Core ``loss_func`` contract.
"""

from .logprobs import vocab_parallel_logprobs
from .megatron_loss import BATCH_KEYS, LossSettings, make_loss_func, reduce_loss_reports
from .objective import (
    ALGORITHMS,
    GRANULARITIES,
    NORMALIZATIONS,
    RiftLossTerms,
    check_settings,
    count_sign_tokens,
    rift_loss_terms,
    rift_token_loss,
)

__all__ = [
    "ALGORITHMS",
    "BATCH_KEYS",
    "GRANULARITIES",
    "NORMALIZATIONS",
    "LossSettings",
    "RiftLossTerms",
    "check_settings",
    "count_sign_tokens",
    "make_loss_func",
    "reduce_loss_reports",
    "rift_loss_terms",
    "rift_token_loss",
    "vocab_parallel_logprobs",
]

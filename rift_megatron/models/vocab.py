"""The padded vocabulary size of a Megatron model: one rule for the provider, conversion, the weight
push and the memory model (which must not import torch, hence this module of its own)."""

from __future__ import annotations

import math

# Megatron-LM pads the vocabulary to 128 x TP. We pad to a multiple of lcm(128, TP) instead:
# the same for every power-of-two TP, so a checkpoint's embedding shape does not depend on the
# layout it was saved with and dist_checkpointing can reshard it to any TP.
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Smallest size >= vocab_size divisible by `multiple` and by the tensor-parallel size."""
    unit = math.lcm(multiple, tensor_parallel)
    return -(-vocab_size // unit) * unit

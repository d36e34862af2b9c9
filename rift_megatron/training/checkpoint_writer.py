"""How the sharded part of a checkpoint reaches the disk: synchronously or in the background,
written by the replica owners or spread over the data-parallel group.

A 72B checkpoint with optimizer state is about 1 TB. Written synchronously the GPUs idle for
the whole write; with `asynchronous`, Megatron-Core's async save (the torch_dist strategy's
`async_save` + `AsyncCallsQueue`, as Megatron-LM's `--async-save`) copies the tensors to host
memory, forks a writer process and returns: training goes on while it writes. `fully_parallel`
(Megatron-LM's `--ckpt-fully-parallel-save`) spreads the writing of replicated tensors over the
data-parallel group instead of leaving it all to data-parallel rank 0.

Both modes run the same protocol, Megatron-Core's `AsyncRequest`: the write, then on every rank
the request's finalize functions, which run only once every rank's write has completed (the
queue all-reduces "still writing" before finalising; the sync path is `execute_sync`, a barrier).
Megatron's own finalize steps gather every rank's write results (a rank whose writer failed
raises on every rank) and write `.metadata` and `metadata.json`; ours come after them: the
checksums, the rename of the staging directory into place and the `latest` pointer. A checkpoint
therefore becomes `latest` only when it is complete, in either mode, and a kill at any point of
a background write leaves the previous one current.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _then_hash_own_files(write: Callable | None, staging: Path) -> Callable:
    """`write`, then the sha256 of the data files this rank wrote (torch_dist names them
    `__<rank>_<n>.distcp`), recorded as a partial listing: the checksums of a checkpoint are
    computed by its writers, in the background with an asynchronous save, instead of by rank 0
    reading the whole checkpoint back while training waits (trust/checksums.py)."""
    import torch.distributed as dist

    from rift_megatron.trust.checksums import record_partial_checksums

    rank = dist.get_rank() if dist.is_initialized() else 0

    def write_then_hash(*args, **kwargs) -> None:
        if write is not None:
            write(*args, **kwargs)
        record_partial_checksums(staging, f"__{rank}_*.distcp", f"rank{rank:05d}")

    return write_then_hash


class CheckpointWriter:
    """Writes one checkpoint at a time; `poll` each step, `wait` before leaving (collective calls)."""

    def __init__(self, asynchronous: bool = False, fully_parallel: bool = False) -> None:
        self.asynchronous = asynchronous
        self.fully_parallel = fully_parallel
        self._queue = None
        if asynchronous:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # Not persistent: a forked writer per save sees the staged tensors copy-on-write,
            # which on the CPU (where staging is not a copy) is what keeps the snapshot intact.
            self._queue = AsyncCallsQueue(persistent=False)

    def _strategy(self):
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = get_default_save_sharded_strategy()
        if self.fully_parallel and ps.model_parallel_is_initialized():
            strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
        return strategy

    def save(self, sharded_state_dict: dict, staging: Path, finalize: Callable[[], None]) -> None:
        """Collective: write `sharded_state_dict` into `staging`; `finalize` runs on every rank after
        every rank's write (now, or at a later `poll` / `wait` when asynchronous)."""
        from megatron.core import dist_checkpointing

        self.wait()  # the previous checkpoint is complete (and `latest`) before the next one starts
        request = dist_checkpointing.save(sharded_state_dict, str(staging), sharded_strategy=self._strategy(),
                                          async_sharded_save=True)
        request = request._replace(async_fn=_then_hash_own_files(request.async_fn, staging))
        request.add_finalize_fn(finalize)
        if self._queue is None:
            request.execute_sync()
        else:
            self._queue.schedule_async_request(request)

    def poll(self) -> None:
        """Collective: finalise the background writes that every rank has finished (cheap: one
        all-reduce of a flag); call once per training step."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective: block until every pending write is written and finalised."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    def pending(self) -> int:
        """Writes started but not yet finalised."""
        return self._queue.get_num_unfinalized_calls() if self._queue is not None else 0

    def abandon(self) -> None:
        """Not collective (the run is failing): stop this rank's background writers without
        finalising, so their checkpoints stay staged and never become `latest`."""
        if self._queue is None:
            return
        while self._queue.async_calls:
            self._queue.async_calls.popleft().async_caller.close(abort=True)

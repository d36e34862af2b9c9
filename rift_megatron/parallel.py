"""torch.distributed and Megatron-Core parallel-state set-up.

Works the same under `torchrun` (reads RANK / WORLD_SIZE / MASTER_ADDR from the environment) and
as a plain single process (a one-rank group on a private file rendezvous), so `rift demo` and the
tests need no launcher.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rift_megatron.platform import Platform, current_platform


class ParallelConfigError(ValueError):
    """A parallel layout that does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelLayout:
    """Model-parallel sizes; the data-parallel size is whatever the world size leaves.

    `context`: context parallelism (CP) splits every sequence over this many ranks, which hold
    the same weights and take part in the data-parallel gradient reduction (Megatron's
    data-parallel-with-context-parallel group)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    context: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline is not None:
            if self.virtual_pipeline < 2:
                raise ParallelConfigError(
                    f"parallel.virtual_pipeline must be None or >= 2, got {self.virtual_pipeline}"
                )
            if self.pipeline < 2:
                raise ParallelConfigError("parallel.virtual_pipeline needs parallel.pipeline >= 2")
        if self.sequence_parallel and self.tensor < 2:
            raise ParallelConfigError("parallel.sequence_parallel needs parallel.tensor >= 2")

    @property
    def sequence_multiple(self) -> int:
        """What every sequence length fed to the model must be a multiple of: context parallelism
        cuts it into 2 x CP equal chunks (training/context_parallel.py), and sequence parallelism
        then splits each rank's share over the tensor-parallel ranks (Megatron asserts both)."""
        chunks = 2 * self.context if self.context > 1 else 1
        return chunks * (self.tensor if self.sequence_parallel else 1)

    @property
    def ranks_per_replica(self) -> int:
        """TP x PP x CP: the ranks that hold one copy of the model and see one data-parallel share."""
        return self.tensor * self.pipeline * self.context

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (TP x PP x CP); raises a readable error when that does not divide."""
        if world_size % self.ranks_per_replica:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tensor ({self.tensor}) x "
                f"pipeline ({self.pipeline}) x context ({self.context}) = {self.ranks_per_replica}"
            )
        return world_size // self.ranks_per_replica


def private_rendezvous() -> str:
    """A fresh file rendezvous (`file://...`) for a group of this machine's processes: nothing to
    pick and lose to a race, unlike a free port chosen now and bound later. Removed at exit."""
    directory = tempfile.mkdtemp(prefix="rift-rendezvous-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return f"file://{directory}/store"


def init_distributed(timeout: timedelta = timedelta(minutes=30), cpu_only: bool = False) -> Platform:
    """Create the default process group (idempotent) with the platform's backend.

    `cpu_only`: a gloo group and no GPU bound, whatever the machine: for CPU work such as checkpoint
    conversion, which must not create a CUDA context (or take any GPU memory) on a GPU node.
    """
    platform = current_platform()
    if dist.is_initialized():
        return platform
    backend = "gloo" if cpu_only else platform.backend
    if not cpu_only:
        platform.bind_local_device()
    if "WORLD_SIZE" in os.environ:  # torchrun / Slurm with the env:// variables set
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend,
            init_method=private_rendezvous(),
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    return platform


_ROLLOUT_WAIT_GROUP = None


def init_rollout_wait_group(timeout: timedelta) -> None:
    """Collective: the CPU gloo group in which ranks wait for every engine's rollout, with a
    timeout of its own sized to a rollout (engines finish at different times; waiting inside a
    training collective would hit its shorter timeout)."""
    global _ROLLOUT_WAIT_GROUP
    if dist.is_initialized() and dist.get_world_size() > 1:
        _ROLLOUT_WAIT_GROUP = dist.new_group(backend="gloo", timeout=timeout)


def rollout_wait_group():
    """The group of `init_rollout_wait_group` (None: the default group)."""
    return _ROLLOUT_WAIT_GROUP


def init_model_parallel(layout: ParallelLayout, seed: int | None, timeout_minutes: float = 30.0) -> None:
    """Initialise Megatron's TP/PP/CP/DP groups for `layout` and seed its RNG tracker.

    `model_parallel_cuda_manual_seed` also reseeds the CPU generator on CPU (see cpu_compat), so
    anything else that needs seeding must be seeded after this call. `seed=None` seeds nothing
    (work that initialises no weights, such as conversion: seeding would touch the CUDA RNG).
    """
    from megatron.core import parallel_state, tensor_parallel

    layout.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    before = _process_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        distributed_timeout_minutes=timeout_minutes,
    )
    _MEGATRON_GROUPS[:] = [group for group in _process_groups() if group not in before]
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


# The process groups Megatron's initialize_model_parallel created (destroyed with its state).
_MEGATRON_GROUPS: list = []


def _process_groups() -> set:
    """Every live process group of this process (torch has no public listing)."""
    return set(dist.distributed_c10d._world.pg_map)


def destroy_model_parallel() -> None:
    """Tear down Megatron's groups and destroy the process groups it created; the default group
    and groups created by others stay. Megatron's own teardown only forgets its groups, and every
    gloo group keeps a TCP loop thread: a process that builds one layout after another (the
    tests, a benchmark) collected ~50 threads per layout, thousands in a test session, whose
    wake-ups kept a core busy (69% of it in the kernel)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    live = _process_groups()
    for group in _MEGATRON_GROUPS:
        if group in live:
            dist.destroy_process_group(group)
            live = _process_groups()  # destroying one group may release others registered with it
    _MEGATRON_GROUPS.clear()


# What torchrun / torchelastic put in a worker's environment: a child process that inherits them
# joins (and hangs in) the parent's rendezvous as soon as it initialises torch.distributed.
_LAUNCHER_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)


def standalone_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without the launcher's variables, for a subprocess that must
    run as a world of its own (e.g. the start-up checkpoint conversion under torchrun)."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if k not in _LAUNCHER_VARIABLES and not k.startswith("TORCHELASTIC_")}


def is_main_rank() -> bool:
    """Rank 0 of the world (or a process without torch.distributed)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM all-reduce that is a no-op without a process group."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, group)


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place MAX all-reduce that is a no-op without a process group."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, group)


def all_reduce_sum_differentiable(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Out-of-place SUM all-reduce whose backward all-reduces the gradient too (no-op without a
    group of > 1 ranks). For a loss that is a sum of per-rank terms which all depend on the
    reduced value (e.g. per-sequence sums split over context-parallel ranks): the gradient of the
    total w.r.t. one rank's contribution is the sum of every rank's gradient w.r.t. the result."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor

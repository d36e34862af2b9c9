"""The seeded, resumable prompt sampler.

The sampler defines ONE global stream of prompt indices: epoch 0's shuffled permutation of
``range(num_prompts)``, then epoch 1's, and so on, each from ``(seed, epoch)`` alone. Step k takes
the next ``prompts_per_step`` indices of the stream. Consequences:

- every prompt appears exactly once per epoch, and the order depends only on the seed;
- a step's batch can straddle an epoch boundary (when ``num_prompts`` is not a multiple of
  ``prompts_per_step``): it then ends with the last prompts of epoch e and starts epoch e+1, so the
  same prompt can occur twice in that batch. ``prompts_per_step > num_prompts`` is allowed for the
  same reason (one step covers more than an epoch); nothing is dropped;
- the stream never depends on the data-parallel size: every rank draws the same global batch and
  keeps its contiguous share (:meth:`PromptSampler.shard`), so a run resumed on a different number
  of ranks sees exactly the same prompts.

The state (:meth:`PromptSampler.state_dict`) is ``(seed, epoch, position)`` plus ``num_prompts``
as a check: a restored sampler continues the stream exactly where the saved one stopped. The
permutation comes from NumPy's legacy ``RandomState`` (Mersenne Twister), whose stream NumPy keeps
frozen across versions, so a checkpoint resumes identically after an upgrade.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["PromptSampler"]

T = TypeVar("T")
_STATE_VERSION = 1
_MAX_SEED = 2**64 - 1


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class PromptSampler:
    """Seeded epoch shuffling over ``num_prompts`` prompts, ``prompts_per_step`` per step.

    Iterate it (or call :meth:`next_batch`) for the global batch of prompt indices of each step;
    each data-parallel rank then takes :meth:`shard` of it.

    Args:
        num_prompts: size of the prompt set (>= 1).
        prompts_per_step: prompts in one global batch (>= 1; may exceed ``num_prompts``, see the
            module docstring).
        seed: 0 <= seed < 2**64.
        shuffle: False keeps file order in every epoch (for evaluation and debugging).
    """

    def __init__(self, num_prompts: int, prompts_per_step: int, *, seed: int = 0, shuffle: bool = True):
        self.num_prompts = _check_int("num_prompts", num_prompts, 1)
        self.prompts_per_step = _check_int("prompts_per_step", prompts_per_step, 1)
        self.seed = _check_int("seed", seed, 0)
        if self.seed > _MAX_SEED:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be a bool, got {shuffle!r}")
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0  # index into the current epoch's permutation of the next prompt
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    # -------------------------------------------------------------------------------- stream

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been drawn."""
        return self._position

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation of ``range(num_prompts)`` that epoch ``epoch`` visits."""
        return [int(i) for i in self._permutation(_check_int("epoch", epoch, 0))]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                key = [self.seed & 0xFFFFFFFF, self.seed >> 32, epoch & 0xFFFFFFFF, epoch >> 32]
                self._order = np.random.RandomState(np.array(key, dtype=np.uint32)).permutation(self.num_prompts)
            else:
                self._order = np.arange(self.num_prompts)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_batch(self) -> list[int]:
        """The next global batch: ``prompts_per_step`` prompt indices."""
        batch: list[int] = []
        while len(batch) < self.prompts_per_step:
            order = self._permutation(self._epoch)
            take = min(self.prompts_per_step - len(batch), self.num_prompts - self._position)
            batch.extend(int(i) for i in order[self._position : self._position + take])
            self._position += take
            if self._position == self.num_prompts:
                self._epoch += 1
                self._position = 0
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    # ---------------------------------------------------------------------- data parallelism

    @staticmethod
    def shard(batch_indices: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
        """This data-parallel rank's contiguous, equal share of a global batch (rank 0 first),
        the same split as :func:`rift_megatron.training.batch.shard_for_data_parallel`."""
        dp_size = _check_int("dp_size", dp_size, 1)
        dp_rank = _check_int("dp_rank", dp_rank, 0)
        if dp_rank >= dp_size:
            raise ValueError(f"dp_rank must be < dp_size={dp_size}, got {dp_rank}")
        if len(batch_indices) % dp_size:
            raise ValueError(
                f"a global batch of {len(batch_indices)} prompts does not split evenly over "
                f"{dp_size} data-parallel ranks; make prompts_per_step a multiple of the data-parallel size"
            )
        per_rank = len(batch_indices) // dp_size
        return list(batch_indices[dp_rank * per_rank : (dp_rank + 1) * per_rank])

    # ---------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, int]:
        """Plain ints (safe in any checkpoint format): where the stream stands."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_prompts": self.num_prompts,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream of a saved sampler.

        The seed, prompt count and shuffle flag must match this sampler's (a different prompt
        file or seed would make the saved position meaningless). ``prompts_per_step`` may differ:
        the stream then continues in batches of the new size.
        """
        missing = [k for k in ("seed", "epoch", "position", "num_prompts") if k not in state]
        if missing:
            raise ValueError(f"sampler state is missing {missing}; got keys {sorted(state)}")
        version = state.get("version", _STATE_VERSION)
        if version != _STATE_VERSION:
            raise ValueError(f"sampler state has version {version}, this code reads version {_STATE_VERSION}")
        seed = _check_int("state['seed']", state["seed"], 0)
        num_prompts = _check_int("state['num_prompts']", state["num_prompts"], 1)
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        position = _check_int("state['position']", state["position"], 0)
        shuffle = bool(state.get("shuffle", True))
        if num_prompts != self.num_prompts:
            raise ValueError(
                f"sampler state is for {num_prompts} prompts but this prompt set has {self.num_prompts}: "
                "the prompt file changed since the checkpoint"
            )
        if seed != self.seed:
            raise ValueError(f"sampler state has seed {seed} but this sampler was built with seed {self.seed}")
        if shuffle != self.shuffle:
            raise ValueError(f"sampler state has shuffle={shuffle} but this sampler has shuffle={self.shuffle}")
        if position >= num_prompts:
            raise ValueError(f"sampler state position {position} must be < num_prompts={num_prompts}")
        self._epoch, self._position = epoch, position

    def __repr__(self) -> str:
        return (
            f"PromptSampler(num_prompts={self.num_prompts}, prompts_per_step={self.prompts_per_step}, "
            f"seed={self.seed}, shuffle={self.shuffle}, epoch={self._epoch}, position={self._position})"
        )

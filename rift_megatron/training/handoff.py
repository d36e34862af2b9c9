"""Who holds the device memory of a co-located rank: the trainer or the rollout engine.

Every phase of the loop says what it needs and the handoff makes it so, in the order verl and
NeMo-RL use (issue 15):

    trainer trains -> engine wakes weights -> push -> trainer offloads -> engine wakes KV cache
    -> generate -> engine sleeps (level 2: weights discarded, the next push restores them)
    -> trainer reloads -> trainer trains

* `for_training()` (a training step, a weight push, a checkpoint): the engine's KV cache is
  released (a level-2 sleep: the engine's weights are stale after the next optimizer step anyway,
  so keeping a host copy would only cost memory and a copy back) and the trainer's offloaded parts
  come back.
* `for_generation()` (a rollout, an evaluation, the offline push probe): the trainer's chosen parts
  go to host memory and the engine's KV cache wakes. If the engine's weights were discarded since
  the last push (a checkpoint written right after an evaluation), they are pushed again first.
* A push (`weight_sync.push_weights`, called by the trainer after `for_training()`) wakes only the
  engine's weights, so trainer and engine weights are resident together just for the push.

The trainer offloads once more before the engine is built (`Trainer._build_data`): vLLM sizes its
KV cache from the device memory free when it starts.

On the CPU the engine's sleep and wake are bookkeeping only (vLLM's sleep mode is GPU-only) and
the trainer's offload runs host to host: the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

from rift_megatron.training.offload import TrainerOffload

# vLLM sleep level while the trainer trains: discard weights and KV cache (no host copy).
ENGINE_SLEEP_LEVEL = 2


class MemoryHandoff:
    """Moves one rank's device memory between its trainer (`offload`) and its engine."""

    def __init__(self, engine, offload: TrainerOffload, push: Callable[[], dict]) -> None:
        self.engine = engine
        self.offload = offload
        self.push = push  # the trainer's weight push (it calls for_training() itself)

    def for_training(self) -> dict[str, float]:
        """Engine asleep (KV cache and weights discarded), trainer resident; the metrics of the
        trainer's offload cycle that ends here (`TrainerOffload.reload`)."""
        if self.engine.kv_cache_awake:
            self.engine.sleep(level=ENGINE_SLEEP_LEVEL)
        return self.offload.reload()

    def for_generation(self) -> dict[str, float]:
        """Trainer offloaded (its chosen parts), engine awake with current weights; the push's
        metrics if the engine's weights had to be pushed again, else {}."""
        metrics = self.push() if self.engine.weights_discarded else {}
        self.offload.offload()
        self.engine.wake_up(["kv_cache"])
        return metrics

"""The rollout data loader: prompts -> co-located engines -> rewards -> this rank's train batch.

One online step, collectively over the trainer's world:
  1. the sampler gives the step's global prompt batch (identical on every rank);
  2. it is split across engines (one per rank, or one per R ranks with engine TP R), every rank
     of one engine submitting the same prompts and seeds (vLLM's rule for external_launcher);
  3. each engine's leader scores its own samples in the verifier pool (in parallel across ranks);
  4. `exchange.py` moves them as tensors: a few numbers per sample to every rank (metrics, the
     non-finite check), response ids and log-probs only to the ranks of the data-parallel replica
     that trains on them (its contiguous share of the rollout in the sampler's order: prompt
     order, then sample index, whatever the parallel layout);
  5. each rank turns its share into the Megatron batch.
The global rollout does not depend on how many ranks or engines there are: request seeds come
from (seed, step, global prompt index).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

from rift_megatron.data.prompts import PromptRecord
from rift_megatron.data.sampler import PromptSampler
from rift_megatron.exits import first_line
from rift_megatron.rollout.batching import Sample, build_train_batch
from rift_megatron.rollout.engine import RolloutEngine, SamplingConfig
from rift_megatron.rollout.errors import RolloutFailure, WeightSyncError
from rift_megatron.rollout.exchange import Exchanged, exchange_rollout
from rift_megatron.rollout.verifier_pool import VerifierPool
from rift_megatron.training.batch import TrainBatch


@dataclass
class RolloutBatch:
    """What one rollout step produced: this rank's training batch and the step's metrics."""

    train_batch: TrainBatch
    metrics: dict[str, float]


def split_contiguous(items: Sequence[int], parts: int) -> list[list[int]]:
    """Contiguous, nearly equal shares (the first ones one longer when uneven)."""
    base, extra = divmod(len(items), parts)
    shares, start = [], 0
    for index in range(parts):
        stop = start + base + (index < extra)
        shares.append(list(items[start:stop]))
        start = stop
    return shares


class RolloutDataLoader:
    """Produces one `RolloutBatch` per online step (collective over the world)."""

    def __init__(
        self,
        records: Sequence[PromptRecord],
        prompt_ids: Sequence[list[int]],
        sampler: PromptSampler,
        engine: RolloutEngine,
        pool: VerifierPool,
        *,
        k: int,
        sampling: SamplingConfig,
        pad_id: int,
        engine_tensor_parallel: int = 1,
    ) -> None:
        self.records, self.prompt_ids, self.sampler = records, prompt_ids, sampler
        self.engine, self.pool = engine, pool
        self.k, self.sampling, self.pad_id = k, sampling, pad_id
        self.engine_tp = engine_tensor_parallel

    def next_batch(self, step: int, dp_rank: int, dp_size: int) -> RolloutBatch:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        global_prompts = self.sampler.next_batch()
        if len(global_prompts) * self.k % dp_size:
            raise ValueError(
                f"{len(global_prompts)} prompts x k={self.k} samples do not split over {dp_size} data-parallel ranks"
            )
        engines = world // self.engine_tp
        # Positions in the global batch (a prompt can appear twice across an epoch boundary).
        shares = split_contiguous(range(len(global_prompts)), engines)
        mine = shares[rank // self.engine_tp]
        started = time.perf_counter()
        try:
            generations = self.engine.generate(
                [self.prompt_ids[global_prompts[p]] for p in mine], self.k, self.sampling, step=step, prompt_indices=mine
            )
        except ValueError:
            raise  # a request the engine refuses: bad input, reported as such
        except Exception as error:  # the engine died or broke: say so, not vLLM's internals
            raise RolloutFailure(
                f"rank {rank}: the rollout engine failed while generating rollout {step} "
                f"({type(error).__name__}: {first_line(error)}); the last checkpoint is intact: continue with --resume auto"
            ) from error
        seconds = time.perf_counter() - started
        is_leader = rank % self.engine_tp == 0
        scores = self.pool.score_all([
            (self.records[global_prompts[g.prompt_index]].prompt, g.response_text,
             self.records[global_prompts[g.prompt_index]].answer)
            for g in generations
        ]) if is_leader else []
        rollout = exchange_rollout(generations, scores, seconds, engine_counts=[len(s) * self.k for s in shares],
                                   engine_tp=self.engine_tp, dp_rank=dp_rank, dp_size=dp_size)
        _refuse_non_finite(rollout)  # every rank holds the header: every rank raises
        train_batch = build_train_batch(  # sample g of the rollout answers prompt g // k
            [Sample(self.prompt_ids[global_prompts[g // self.k]], ids, logprobs, float(rollout.rewards[g]))
             for g, ids, logprobs in rollout.share],
            pad_id=self.pad_id,
        )
        return RolloutBatch(train_batch=train_batch, metrics=rollout.metrics())


def _refuse_non_finite(rollout: Exchanged) -> None:
    """A sampled token always has a finite log-prob under the policy that sampled it; NaN or -inf
    means the engine computes garbage (a push that left a layer half-loaded does exactly this)."""
    bad = rollout.first_non_finite()
    if bad is not None:
        sample, token, value, count = bad
        raise WeightSyncError(
            f"the rollout engine returned non-finite log-probs in {count} samples (first: sample {sample} of the "
            f"rollout, token {token}: {value}): its weights are corrupt (a failed weight push?)"
        )

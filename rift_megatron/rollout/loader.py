"""The rollout data loader: prompts -> co-located engines -> rewards -> this rank's train batch.

One online step, collectively over the trainer's world:
  1. the sampler gives the step's global prompt batch (identical on every rank);
  2. it is split across engines (one per rank, or one per R ranks with engine TP R), every rank
     of one engine submitting the same prompts and seeds (vLLM's rule for external_launcher);
  3. each engine's leader scores its own samples in the verifier pool (in parallel across ranks);
  4. samples and scores are all-gathered, so every rank holds the whole global rollout in the
     sampler's order (prompt order, then sample index) whatever the parallel layout;
  5. each data-parallel rank keeps its contiguous share and turns it into the Megatron batch.
The global rollout does not depend on how many ranks or engines there are: request seeds come
from (seed, step, global prompt index).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

from rift_megatron.data.prompts import PromptRecord
from rift_megatron.data.sampler import PromptSampler
from rift_megatron.exits import first_line
from rift_megatron.parallel import rollout_wait_group
from rift_megatron.rollout.batching import Sample, build_train_batch
from rift_megatron.rollout.engine import Generation, RolloutEngine, SamplingConfig
from rift_megatron.rollout.errors import RolloutFailure, WeightSyncError
from rift_megatron.rollout.rewards import RewardResult
from rift_megatron.rollout.verifier_pool import VerifierPool
from rift_megatron.training.batch import TrainBatch


@dataclass(frozen=True)
class ScoredGeneration:
    generation: Generation
    score: RewardResult


@dataclass
class RolloutBatch:
    """What one rollout step produced: this rank's training batch and the step's metrics."""

    train_batch: TrainBatch
    samples: list[ScoredGeneration]
    metrics: dict[str, float]


def _split(items: Sequence[int], parts: int) -> list[list[int]]:
    """Contiguous, nearly equal shares (the first ones one longer when uneven)."""
    base, extra = divmod(len(items), parts)
    shares, start = [], 0
    for index in range(parts):
        stop = start + base + (index < extra)
        shares.append(list(items[start:stop]))
        start = stop
    return shares


def rollout_metrics(samples: Sequence[ScoredGeneration], generation_seconds: float) -> dict[str, float]:
    """Per-step rollout numbers: reward, accuracy, lengths, truncation, generation speed."""
    count = len(samples)
    tokens = sum(len(s.generation.response_ids) for s in samples)
    return {
        "reward_mean": sum(s.score.reward for s in samples) / count if count else 0.0,
        "accuracy": sum(s.score.correct for s in samples) / count if count else 0.0,
        "response_length_mean": tokens / count if count else 0.0,
        "truncated_frac": sum(s.generation.truncated for s in samples) / count if count else 0.0,
        "verifier_timeouts": float(sum(s.score.timed_out for s in samples)),
        "generation_tokens": float(tokens),
        "generation_tokens_per_s": tokens / generation_seconds if generation_seconds > 0 else 0.0,
    }


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
        mine = _split(range(len(global_prompts)), engines)[rank // self.engine_tp]
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
        local = [ScoredGeneration(g, s) for g, s in zip(generations, scores)]
        everyone, slowest = _gather(local, seconds)
        _refuse_non_finite([s.generation for s in everyone])  # after the gather: every rank raises
        samples = sorted(everyone, key=lambda s: (s.generation.prompt_index, s.generation.sample_index))
        shard = PromptSampler.shard(samples, dp_rank, dp_size)
        train_batch = build_train_batch(
            [Sample(s.generation.prompt_ids, s.generation.response_ids, s.generation.behavior_logprobs, s.score.reward)
             for s in shard],
            pad_id=self.pad_id,
        )
        return RolloutBatch(train_batch=train_batch, samples=samples, metrics=rollout_metrics(samples, slowest))


def _refuse_non_finite(generations: Sequence[Generation]) -> None:
    """A sampled token always has a finite log-prob under the policy that sampled it; NaN or -inf
    means the engine computes garbage (a push that left a layer half-loaded does exactly this)."""
    bad = [(g, t) for g in generations for t, value in enumerate(g.behavior_logprobs) if not math.isfinite(value)]
    if bad:
        g, t = bad[0]
        raise WeightSyncError(
            f"the rollout engine returned non-finite log-probs for {len(bad)} sampled tokens (first: prompt "
            f"{g.prompt_index}, sample {g.sample_index}, token {t}: {g.behavior_logprobs[t]}): its weights are "
            "corrupt (a failed weight push?)"
        )


def _gather(local: list[ScoredGeneration], seconds: float) -> tuple[list[ScoredGeneration], float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local, seconds
    gathered: list = [None] * dist.get_world_size()
    # Ranks whose engine finished first wait here for the slowest: in the rollout wait group (CPU,
    # its own timeout), not in a training collective.
    dist.all_gather_object(gathered, (local, seconds), group=rollout_wait_group())
    return [s for part, _ in gathered for s in part], max(t for _, t in gathered)

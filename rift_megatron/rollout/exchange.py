"""Move a rollout's samples from the engines that generated them to the ranks that train on them.

Each engine's leader (the first rank of its engine; it scored the samples) holds a contiguous
piece of the global rollout in the sampler's order. Two steps, both tensors on the CPU in the
rollout wait group (gloo, a rollout-sized timeout):
  1. a header of a few numbers per sample (length, reward, correct, truncated, verifier timeout,
     first non-finite log-prob) is all-gathered: every rank learns the step's metrics, and every
     rank refuses a corrupt rollout together, from O(samples) numbers;
  2. response token ids and behaviour log-probs go point to point from each leader to exactly the
     ranks of the data-parallel replica that trains on them (every TP / PP rank of that replica
     builds the same batch), so each rank receives its data-parallel share, not the whole rollout.
Prompt token ids never move: every rank holds the prompt set and the sampler's batch.
Nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rift_megatron.parallel import rollout_wait_group
from rift_megatron.rollout.engine import Generation
from rift_megatron.rollout.rewards import RewardResult

# Header columns, one row per sample (float64 holds every token count and index exactly).
_LENGTH, _REWARD, _CORRECT, _TRUNCATED, _TIMED_OUT, _BAD_TOKEN, _BAD_VALUE = range(7)
_COLUMNS = 7


@dataclass(frozen=True)
class Exchanged:
    """What every rank learns: the global rollout's per-sample header ([samples, 7], in sampler
    order), the slowest engine's generation seconds, and this rank's data-parallel share as
    (global sample index, response ids, behaviour log-probs)."""

    header: torch.Tensor
    slowest_seconds: float
    share: list[tuple[int, list[int], list[float]]]

    @property
    def rewards(self) -> torch.Tensor:
        return self.header[:, _REWARD]

    def metrics(self) -> dict[str, float]:
        """Per-step rollout numbers over the whole global rollout."""
        count = self.header.shape[0]
        tokens = float(self.header[:, _LENGTH].sum())
        mean = (lambda column: float(self.header[:, column].mean())) if count else (lambda column: 0.0)
        return {
            "reward_mean": mean(_REWARD),
            "accuracy": mean(_CORRECT),
            "response_length_mean": tokens / count if count else 0.0,
            "truncated_frac": mean(_TRUNCATED),
            "verifier_timeouts": float(self.header[:, _TIMED_OUT].sum()),
            "generation_tokens": tokens,
            "generation_tokens_per_s": tokens / self.slowest_seconds if self.slowest_seconds > 0 else 0.0,
        }

    def first_non_finite(self) -> tuple[int, int, float, int] | None:
        """(global sample index, token index, value, samples affected) of the first non-finite
        behaviour log-prob, or None."""
        bad = (self.header[:, _BAD_TOKEN] >= 0).nonzero().flatten()
        if bad.numel() == 0:
            return None
        first = int(bad[0])
        return first, int(self.header[first, _BAD_TOKEN]), float(self.header[first, _BAD_VALUE]), int(bad.numel())


def _header(generations: Sequence[Generation], scores: Sequence[RewardResult]) -> torch.Tensor:
    rows = torch.zeros((len(generations), _COLUMNS), dtype=torch.float64)
    for row, (g, s) in enumerate(zip(generations, scores)):
        bad = next((t for t, value in enumerate(g.behavior_logprobs) if not math.isfinite(value)), -1)
        rows[row] = torch.tensor([len(g.response_ids), s.reward, s.correct, g.truncated, s.timed_out, bad,
                                  g.behavior_logprobs[bad] if bad >= 0 else 0.0], dtype=torch.float64)
    return rows


def exchange_rollout(
    generations: Sequence[Generation], scores: Sequence[RewardResult], seconds: float, *,
    engine_counts: Sequence[int], engine_tp: int, dp_rank: int, dp_size: int,
) -> Exchanged:
    """Collective over the world. `generations` / `scores`: this rank's engine's samples in
    sampler order (`scores` only on the engine's leader, rank % engine_tp == 0; empty elsewhere);
    `engine_counts[e]`: how many samples engine e produced. Returns the global header and this
    rank's data-parallel share (contiguous: replica d trains on samples [d N / dp, (d+1) N / dp))."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    leader = rank % engine_tp == 0
    widest = max(engine_counts, default=0)
    mine = torch.zeros((widest + 1, _COLUMNS), dtype=torch.float64)
    mine[0, 0], mine[0, 1] = seconds, dp_rank
    if leader:
        mine[1:1 + len(generations)] = _header(generations, scores)
    if world > 1:
        everyone = [torch.empty_like(mine) for _ in range(world)]
        # Ranks whose engine finished first wait here for the slowest: in the rollout wait group
        # (CPU, its own timeout), not in a training collective.
        dist.all_gather(everyone, mine, group=rollout_wait_group())
    else:
        everyone = [mine]
    dp_of = [int(part[0, 1]) for part in everyone]
    header = torch.cat([everyone[e * engine_tp][1:1 + count] for e, count in enumerate(engine_counts)])
    first = [sum(engine_counts[:e]) for e in range(len(engine_counts))]  # global index of each engine's first sample
    per_replica = header.shape[0] // dp_size

    def replica(index: int) -> int:
        return index // per_replica

    lengths = header[:, _LENGTH].long().tolist()
    share: dict[int, tuple[list[int], list[float]]] = {}
    ops, inbox = [], []
    if leader:
        engine = rank // engine_tp
        for peer in range(world):
            wanted = [i for i in range(len(generations)) if replica(first[engine] + i) == dp_of[peer]]
            if not wanted:
                continue
            if peer == rank:
                share.update({first[engine] + i: (list(generations[i].response_ids), list(generations[i].behavior_logprobs))
                              for i in wanted})
                continue
            ids = torch.tensor([t for i in wanted for t in generations[i].response_ids], dtype=torch.int64)
            logprobs = torch.tensor([v for i in wanted for v in generations[i].behavior_logprobs], dtype=torch.float64)
            ops += [dist.P2POp(dist.isend, ids, peer, rollout_wait_group(), tag=0),
                    dist.P2POp(dist.isend, logprobs, peer, rollout_wait_group(), tag=1)]
    for engine, count in enumerate(engine_counts):
        source = engine * engine_tp
        wanted = [first[engine] + i for i in range(count) if replica(first[engine] + i) == dp_rank]
        if source == rank or not wanted:
            continue
        tokens = sum(lengths[g] for g in wanted)
        ids, logprobs = torch.empty(tokens, dtype=torch.int64), torch.empty(tokens, dtype=torch.float64)
        inbox.append((wanted, ids, logprobs))
        ops += [dist.P2POp(dist.irecv, ids, source, rollout_wait_group(), tag=0),
                dist.P2POp(dist.irecv, logprobs, source, rollout_wait_group(), tag=1)]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for wanted, ids, logprobs in inbox:
        pieces = [lengths[g] for g in wanted]
        for g, piece_ids, piece_logprobs in zip(wanted, ids.split(pieces), logprobs.split(pieces)):
            share[g] = (piece_ids.tolist(), piece_logprobs.tolist())
    return Exchanged(header=header, slowest_seconds=max(float(part[0, 0]) for part in everyone),
                     share=[(g, *share[g]) for g in sorted(share)])

"""Held-out evaluation with the math reward: greedy pass@1, plus pass@k and majority@k.

Used by the trainer's periodic eval, `rift eval` and the demo, so all three measure the same
way. Under torchrun every engine evaluates its share of the prompts (not the whole set on
every engine). Greedy pass@1 samples one response at temperature 0. With k > 1, k responses are sampled
at `temperature`: pass@k is the unbiased estimator over them, majority@k asks whether the most
frequent extracted final answer is correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist

from rift_megatron.data.prompts import PromptRecord
from rift_megatron.parallel import rollout_wait_group
from rift_megatron.rollout.engine import RolloutEngine, SamplingConfig
from rift_megatron.rollout.rewards import extract_final_answer, majority_vote, pass_at_k
from rift_megatron.rollout.verifier_pool import VerifierPool


def _score(pool: VerifierPool, records: Sequence[PromptRecord], generations) -> list[bool]:
    results = pool.score_all([
        (records[g.prompt_index].prompt, g.response_text, records[g.prompt_index].answer) for g in generations
    ])
    return [r.correct for r in results]


def _engine_share(prompts: int, engine_tp: int) -> tuple[list[int], bool]:
    """This rank's engine's contiguous share of the eval prompts (global indices) and whether this
    rank leads (scores for) its engine; one share per engine, as the rollout loader splits."""
    from rift_megatron.rollout.loader import split_contiguous

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return split_contiguous(range(prompts), world // engine_tp)[rank // engine_tp], rank % engine_tp == 0


def _sum_over_engines(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over every rank (non-leaders contribute zeros): each engine filled only
    its own prompts' entries, so the sum is the whole eval set's."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, group=rollout_wait_group())
    return values


def evaluate(
    engine: RolloutEngine,
    records: Sequence[PromptRecord],
    prompt_ids: Sequence[list[int]],
    pool: VerifierPool,
    *,
    max_tokens: int,
    k: int = 1,
    temperature: float = 1.0,
    step: int = 0,
    engine_tp: int = 1,
) -> dict:
    """Accuracy numbers over all `records` (prompt i is `prompt_ids[i]`); collective over the
    world when it has several engines (one per `engine_tp` ranks): each engine generates and
    scores its contiguous share of the prompts and the per-prompt results are summed, so every
    rank returns the numbers of the whole set. Requests are seeded by global prompt index, so the
    result does not depend on the split."""
    mine, leader = _engine_share(len(records), engine_tp)
    n = len(records)
    # per prompt: greedy correct, pass@k, majority@k; then the sampled responses' correct count
    totals = torch.zeros(3 * n + 1, dtype=torch.float64)
    greedy = engine.generate([prompt_ids[i] for i in mine], 1, SamplingConfig(temperature=0.0, max_tokens=max_tokens),
                             step=step, prompt_indices=mine)
    if leader:
        for generation, correct in zip(greedy, _score(pool, records, greedy)):
            totals[generation.prompt_index] = float(correct)
    if k > 1:
        sampled = engine.generate([prompt_ids[i] for i in mine], k,
                                  replace(SamplingConfig(max_tokens=max_tokens), temperature=temperature),
                                  step=step, prompt_indices=mine)
        if leader:
            correct = _score(pool, records, sampled)
            by_prompt: dict[int, list[int]] = {}
            for index, generation in enumerate(sampled):
                by_prompt.setdefault(generation.prompt_index, []).append(index)
            for prompt_index, members in by_prompt.items():
                totals[n + prompt_index] = pass_at_k(len(members), sum(correct[i] for i in members), k)
                winner = majority_vote(extract_final_answer(sampled[i].response_text) or None for i in members)
                totals[2 * n + prompt_index] = any(
                    correct[i] for i in members
                    if winner is not None and extract_final_answer(sampled[i].response_text) == winner
                )
            totals[3 * n] = sum(correct)
    totals = _sum_over_engines(totals)
    greedy_correct = [bool(v) for v in totals[:n].tolist()]
    result = {
        "prompts": n,
        "pass@1_greedy": sum(greedy_correct) / n if n else 0.0,
        "per_prompt_greedy_correct": greedy_correct,
    }
    if k > 1 and n:
        result.update({f"pass@{k}": float(totals[n:2 * n].sum()) / n, f"majority@{k}": float(totals[2 * n:3 * n].sum()) / n,
                       "sample_accuracy": float(totals[3 * n]) / (n * k)})
    return result

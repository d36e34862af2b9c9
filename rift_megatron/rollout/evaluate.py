"""Held-out evaluation with the math reward: greedy pass@1, plus pass@k and majority@k.

Used by the trainer's periodic eval, `rift eval` and the demo, so all three measure the same
way. Greedy pass@1 samples one response at temperature 0. With k > 1, k responses are sampled
at `temperature`: pass@k is the unbiased estimator over them, majority@k asks whether the most
frequent extracted final answer is correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from rift_megatron.data.prompts import PromptRecord
from rift_megatron.rollout.engine import RolloutEngine, SamplingConfig
from rift_megatron.rollout.rewards import extract_final_answer, majority_vote, pass_at_k
from rift_megatron.rollout.verifier_pool import VerifierPool


def _score(pool: VerifierPool, records: Sequence[PromptRecord], generations) -> list[bool]:
    results = pool.score_all([
        (records[g.prompt_index].prompt, g.response_text, records[g.prompt_index].answer) for g in generations
    ])
    return [r.correct for r in results]


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
) -> dict:
    """Accuracy numbers over all `records` (prompt i is `prompt_ids[i]`)."""
    greedy = engine.generate(prompt_ids, 1, SamplingConfig(temperature=0.0, max_tokens=max_tokens), step=step)
    greedy_correct = _score(pool, records, greedy)
    result = {
        "prompts": len(records),
        "pass@1_greedy": sum(greedy_correct) / len(records) if records else 0.0,
        "per_prompt_greedy_correct": greedy_correct,
    }
    if k > 1:
        sampled = engine.generate(
            prompt_ids, k, replace(SamplingConfig(max_tokens=max_tokens), temperature=temperature), step=step
        )
        correct = _score(pool, records, sampled)
        by_prompt: dict[int, list[int]] = {}
        for index, generation in enumerate(sampled):
            by_prompt.setdefault(generation.prompt_index, []).append(index)
        pass_k = majority = 0.0
        for prompt_index, members in by_prompt.items():
            pass_k += pass_at_k(len(members), sum(correct[i] for i in members), k)
            winner = majority_vote(extract_final_answer(sampled[i].response_text) or None for i in members)
            majority += any(
                correct[i] for i in members if winner is not None and extract_final_answer(sampled[i].response_text) == winner
            )
        result.update({f"pass@{k}": pass_k / len(by_prompt), f"majority@{k}": majority / len(by_prompt),
                       "sample_accuracy": sum(correct) / len(correct)})
    return result

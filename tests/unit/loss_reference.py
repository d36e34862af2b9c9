"""An independent float64 reference for the RIFT family, for tests only.

Written differently from ``rift_megatron.loss`` on purpose: plain Python floats, loops over
samples and tokens, ``math.exp``, and the gradient dL/dl derived BY HAND (no autograd), straight
from the table in docs/objective.md. It computes the loss of one whole batch (no
micro-batch bookkeeping): the package's split/summed results are compared against it.
"""

from __future__ import annotations

import math


def reference_loss_and_grad(
    logprobs: list[list[float]],
    behavior: list[list[float]],
    rewards: list[float],
    mask: list[list[int]],
    *,
    algorithm: str,
    ratio_cap: float | None = None,
    granularity: str = "token",
    normalization: str = "global",
) -> tuple[float, list[list[float]], int]:
    """Return (L, dL/dl as a [batch][seq] list, Z = number of counted tokens)."""
    n_samples, n_steps = len(rewards), len(mask[0]) if mask else 0
    pos_sum = neg_sum = 0.0
    pos_count = neg_count = 0
    # Per-token gradient of the UNNORMALISED sums, split by sign.
    g_pos = [[0.0] * n_steps for _ in range(n_samples)]
    g_neg = [[0.0] * n_steps for _ in range(n_samples)]
    cap = math.inf if ratio_cap is None else float(ratio_cap)

    for i in range(n_samples):
        reward = float(rewards[i])
        steps = [t for t in range(n_steps) if mask[i][t]]
        if algorithm == "sft":
            side, weight = "pos", 1.0
        elif algorithm == "rft":
            side, weight = ("pos", 1.0) if reward > 0 else (None, 0.0)
        elif algorithm in ("rift", "naive"):
            side, weight = ("pos", reward) if reward > 0 else ("neg", reward) if reward < 0 else (None, 0.0)
        else:
            raise AssertionError(algorithm)
        if side is None:
            continue

        if side == "pos":
            for t in steps:
                pos_sum += -weight * logprobs[i][t]
                g_pos[i][t] += -weight
                pos_count += 1
            continue

        neg_count += len(steps)
        if algorithm == "naive":
            for t in steps:
                neg_sum += -reward * logprobs[i][t]
                g_neg[i][t] += -reward
        elif granularity == "token":
            for t in steps:
                rho = math.exp(logprobs[i][t] - behavior[i][t])
                if rho > cap:  # constant term: no gradient
                    neg_sum += abs(reward) * cap
                else:
                    neg_sum += abs(reward) * rho
                    g_neg[i][t] += abs(reward) * rho
        else:  # sequence ratio, shared by every token of the sample
            if not steps:
                continue
            mean_log_ratio = sum(logprobs[i][t] - behavior[i][t] for t in steps) / len(steps)
            rho_i = math.exp(mean_log_ratio)
            for _term in steps:  # one term |r| * min(rho_i, C) per token
                if rho_i > cap:
                    neg_sum += abs(reward) * cap
                else:
                    neg_sum += abs(reward) * rho_i
                    # d rho_i / d l_it = rho_i / len(steps), for every t of the sample
                    for t in steps:
                        g_neg[i][t] += abs(reward) * rho_i / len(steps)

    total = pos_count + neg_count
    if normalization == "global":
        pos_scale = neg_scale = (1.0 / total) if total else 0.0
    elif normalization == "per_sign":
        pos_scale = (1.0 / pos_count) if pos_count else 0.0
        neg_scale = (1.0 / neg_count) if neg_count else 0.0
    else:
        raise AssertionError(normalization)
    loss = pos_sum * pos_scale + neg_sum * neg_scale
    grad = [[g_pos[i][t] * pos_scale + g_neg[i][t] * neg_scale for t in range(n_steps)] for i in range(n_samples)]
    return loss, grad, total


def reference_logprobs(
    logits: list[list[float]], targets: list[int], vocab_size: int
) -> tuple[list[float], list[list[float]]]:
    """log softmax over the first ``vocab_size`` columns, per row, and d logp / d logits by hand."""
    out, grads = [], []
    for row, y in zip(logits, targets):
        real = row[:vocab_size]
        top = max(real)
        norm = sum(math.exp(z - top) for z in real)
        out.append(real[y] - top - math.log(norm))
        probs = [math.exp(z - top) / norm for z in real]
        grads.append([(1.0 if j == y else 0.0) - probs[j] for j in range(vocab_size)] + [0.0] * (len(row) - vocab_size))
    return out, grads

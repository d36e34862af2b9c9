"""A fixed, seeded training batch with every sign of reward, shared by the tests of the step.

It is not a task: tokens are random. It gives the tests one realistic batch shape (ragged
prompts, right padding, positive / negative / zero rewards).
"""

from __future__ import annotations

import torch

from rift_megatron.training.batch import TrainBatch

MIXED_REWARDS = (1.0, -0.2, 0.0, 1.0, -1.0, 0.5, -0.2, 1.0)


def mixed_reward_batch(
    seed: int = 0,
    seq_len: int = 24,
    vocab_size: int = 1000,
    rewards: tuple[float, ...] = MIXED_REWARDS,
    shortest: int | None = None,
) -> TrainBatch:
    """A batch with prompts of different lengths, right padding, and every sign of reward.

    Rows end (their padding starts) between `shortest` and `seq_len` tokens; by default between
    3/4 of `seq_len` and `seq_len`. A short `shortest` gives the ragged lengths packing is for.

    Behaviour log-probs are drawn around log(1/vocab) so the RIFT ratio rho starts near 1 but not
    at it, which exercises the negative branch's ratio.
    """
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(rewards)
    tokens = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    prompt_len = torch.randint(3, seq_len // 2, (batch_size,), generator=generator)
    end = torch.randint(seq_len * 3 // 4 if shortest is None else shortest, seq_len + 1, (batch_size,), generator=generator)
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    # targets[t] = tokens[t + 1]; a target is a response token when t + 1 >= prompt_len and
    # t + 1 < end (the rest of the row is padding).
    target_pos = positions + 1
    loss_mask = ((target_pos >= prompt_len[:, None]) & (target_pos < end[:, None])).float()
    targets = torch.roll(tokens, shifts=-1, dims=1)
    behavior = -torch.log(torch.tensor(float(vocab_size))) + 0.3 * torch.randn(
        batch_size, seq_len, generator=generator
    )
    return {
        "tokens": tokens,
        "position_ids": positions.contiguous(),
        "targets": targets,
        "loss_mask": loss_mask,
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "behavior_logprobs": behavior * loss_mask,
    }

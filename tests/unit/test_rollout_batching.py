"""Tests of rift_megatron.rollout.batching: samples -> the training batch (exact small example,
token-by-token alignment of targets and behaviour log-probs, padding, errors, the loss on it)."""

from __future__ import annotations

import random

import pytest
import torch

from rift_megatron.loss import rift_token_loss
from rift_megatron.rollout.batching import Sample, build_train_batch, count_loss_tokens
from rift_megatron.training.batch import BATCH_KEYS, shard_for_data_parallel, validate_batch


def test_hand_computed_example():
    sample = Sample(prompt_ids=[5, 6, 7], response_ids=[8, 9], behavior_logprobs=[-0.5, -1.25], reward=-0.2)
    batch = build_train_batch([sample], pad_id=0, seq_len=7)
    assert set(batch) == set(BATCH_KEYS)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6]]
    assert batch["targets"].tolist() == [[6, 7, 8, 9, 0, 0, 0]]
    # targets[2] = 8 and targets[3] = 9 are the response tokens.
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0]]
    assert batch["behavior_logprobs"].tolist() == [[0, 0, -0.5, -1.25, 0, 0, 0]]
    assert batch["rewards"].tolist() == [pytest.approx(-0.2)]
    assert batch["tokens"].dtype == batch["targets"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == batch["behavior_logprobs"].dtype == batch["rewards"].dtype == torch.float32


def test_ragged_samples_pad_to_the_longest():
    samples = [
        Sample([1], [2, 3, 4], [-1.0, -2.0, -3.0], 1.0),
        Sample([5, 6, 7, 8], [9], [-4.0], 0.0),
        Sample([10, 11], [], [], -1.0),  # empty response: in the batch, no loss tokens
    ]
    batch = build_train_batch(samples, pad_id=99)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 99], [5, 6, 7, 8, 9], [10, 11, 99, 99, 99]]
    assert batch["targets"].tolist() == [[2, 3, 4, 99, 99], [6, 7, 8, 9, 99], [11, 99, 99, 99, 99]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert batch["behavior_logprobs"].tolist() == [[-1, -2, -3, 0, 0], [0, 0, 0, -4, 0], [0] * 5]
    assert batch["rewards"].tolist() == [1.0, 0.0, -1.0]
    assert count_loss_tokens(batch) == 4


def random_samples(rng: random.Random, n: int, vocab: int = 50) -> list[Sample]:
    samples = []
    for _ in range(n):
        p_len, r_len = rng.randint(1, 9), rng.randint(0, 9)
        samples.append(Sample(
            prompt_ids=[rng.randrange(1, vocab) for _ in range(p_len)],
            response_ids=[rng.randrange(1, vocab) for _ in range(r_len)],
            behavior_logprobs=[-rng.uniform(0.0, 8.0) for _ in range(r_len)],
            reward=rng.choice([1.0, -0.2, 0.0, 0.5]),
        ))
    return samples


@pytest.mark.parametrize("seed", range(5))
def test_alignment_property_on_random_samples(seed):
    rng = random.Random(seed)
    samples = random_samples(rng, 9)
    batch = build_train_batch(samples, pad_id=0, pad_to_multiple_of=4)
    validate_batch(batch)
    assert batch["tokens"].shape[1] % 4 == 0
    assert batch["tokens"].shape[1] - max(len(s.prompt_ids) + len(s.response_ids) for s in samples) < 4
    assert torch.equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    assert count_loss_tokens(batch) == sum(len(s.response_ids) for s in samples)
    for i, s in enumerate(samples):
        positions = batch["loss_mask"][i].nonzero().flatten().tolist()
        # The masked positions, in order, predict exactly the response tokens, and carry their
        # behaviour log-probs.
        assert [int(batch["targets"][i, t]) for t in positions] == s.response_ids
        got = [float(batch["behavior_logprobs"][i, t]) for t in positions]
        assert got == pytest.approx(s.behavior_logprobs, rel=1e-6)
        for t in positions:  # ... and each predicts from the prefix ending at t
            assert batch["tokens"][i, : t + 1].tolist() == (s.prompt_ids + s.response_ids)[: t + 1]
        unmasked = batch["loss_mask"][i] == 0
        assert bool((batch["behavior_logprobs"][i][unmasked] == 0).all())
        assert batch["tokens"][i, len(s.prompt_ids) + len(s.response_ids):].eq(0).all()
        assert batch["rewards"][i].item() == pytest.approx(s.reward)


def test_seq_len_and_pad_to_multiple_of():
    samples = [Sample([1, 2], [3], [-1.0], 1.0)]
    assert build_train_batch(samples, pad_id=0, seq_len=8)["tokens"].shape == (1, 8)
    assert build_train_batch(samples, pad_id=0, seq_len=3)["tokens"].shape == (1, 3)  # exactly full
    assert build_train_batch(samples, pad_id=0, pad_to_multiple_of=8)["tokens"].shape == (1, 8)
    assert build_train_batch(samples, pad_id=0, pad_to_multiple_of=3)["tokens"].shape == (1, 3)
    assert build_train_batch(samples, pad_id=0, seq_len=16, pad_to_multiple_of=8)["tokens"].shape == (1, 16)
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
        build_train_batch(samples, pad_id=0, seq_len=10, pad_to_multiple_of=8)


def test_dp_shards_of_the_built_batch_keep_alignment():
    samples = random_samples(random.Random(7), 8)
    batch = build_train_batch(samples, pad_id=0)
    for rank in range(2):
        shard = shard_for_data_parallel(batch, rank, 2)
        rebuilt = build_train_batch(samples[rank * 4 : rank * 4 + 4], pad_id=0, seq_len=batch["tokens"].shape[1])
        for key in BATCH_KEYS:
            assert torch.equal(shard[key], rebuilt[key]), key


@pytest.mark.parametrize(
    "samples, kwargs, words",
    [
        ([Sample([1], [2], [-1.0], 1.0), Sample([1, 2, 3], [4, 5, 6], [-1.0] * 3, 1.0)], {"seq_len": 5},
         ["sample 1", "6 tokens", "seq_len=5", "not truncated"]),
        ([Sample([1], [2], [-1.0], 1.0), Sample([1], [2, 3], [-1.0], 1.0)], {},
         ["sample 1", "1 behaviour log-probs for 2 response tokens"]),
        ([Sample([1], [2], [-1.0], 1.0), Sample([1], [2, 3], [-1.0, -1.0, -1.0], 1.0)], {},
         ["sample 1", "3 behaviour log-probs for 2 response tokens"]),
        ([Sample([1], [2], [-1.0], 1.0), Sample([1], [2], [-1.0], 1.0), Sample([], [2], [-1.0], 1.0)], {},
         ["sample 2", "empty prompt"]),
        ([Sample([1], [2, 3, 4], [-1.0, float("nan"), -1.0], 1.0)], {},
         ["sample 0", "response token 1", "nan"]),
        ([Sample([1], [2], [-1.0], 1.0), Sample([1], [2, 3], [-1.0, float("-inf")], 1.0)], {},
         ["sample 1", "response token 1", "-inf"]),
        ([Sample([1], [2], [-1.0], float("nan"))], {}, ["sample 0", "reward is nan"]),
        ([Sample([1], [2.5], [-1.0], 1.0)], {}, ["sample 0", "response_ids", "integer"]),
        ([Sample([1, -3], [2], [-1.0], 1.0)], {}, ["sample 0", "prompt_ids", "negative"]),
        ([], {}, ["at least one sample"]),
    ],
)
def test_errors_name_the_sample(samples, kwargs, words):
    with pytest.raises(ValueError) as info:
        build_train_batch(samples, pad_id=0, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "kwargs", [{"pad_id": -1}, {"pad_id": 0, "seq_len": 0}, {"pad_id": 0, "pad_to_multiple_of": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_train_batch([Sample([1], [2], [-1.0], 1.0)], **kwargs)


def test_rift_loss_runs_on_the_built_batch():
    samples = random_samples(random.Random(3), 12)
    samples[0] = Sample([3, 4], [5, 6, 7], [-1.0, -2.0, -0.5], 0.0)  # make sure a zero reward is present
    batch = build_train_batch(samples, pad_id=0, pad_to_multiple_of=8)
    current = batch["behavior_logprobs"].clone().requires_grad_(True)  # theta = mu: rho = 1
    loss_sum, num_tokens = rift_token_loss(
        current, batch["behavior_logprobs"], batch["rewards"], batch["loss_mask"]
    )
    expected_tokens = sum(len(s.response_ids) for s in samples if s.reward != 0)
    assert int(num_tokens) == expected_tokens < count_loss_tokens(batch)
    # At rho = 1 every negative term is |r| and every positive term is -r * b.
    expected = sum(
        (abs(s.reward) if s.reward < 0 else -s.reward * b)
        for s in samples if s.reward != 0 for b in s.behavior_logprobs
    )
    assert float(loss_sum.detach()) == pytest.approx(expected, rel=1e-5)
    loss_sum.backward()
    assert torch.isfinite(current.grad).all()
    assert bool((current.grad[batch["loss_mask"] == 0] == 0).all())

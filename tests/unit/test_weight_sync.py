"""Weight-push pieces that need no engine: layer-whole buckets, the mismatch statistic, the
sequence padding and the pre-update check hook (issue 12, items 3, 5, 8).

The engine-side behaviour (a split push corrupts vLLM, a tied LM head goes stale, external-launcher
placement) is tested for real in tests/distributed/test_push_checks.py and the real-model tier.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from rift_megatron.convert.mapping import expand  # noqa: E402
from rift_megatron.loss import LossSettings  # noqa: E402
from rift_megatron.models import parse_hf_config  # noqa: E402
from rift_megatron.models.presets import tiny_hf_config  # noqa: E402
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel  # noqa: E402
from rift_megatron.rollout.weight_sync import (  # noqa: E402
    LogprobMismatch,
    WeightSyncError,
    buckets,
    check_mismatch,
    logprob_mismatch,
    reload_unit,
)
from rift_megatron.training.batch import pad_sequences  # noqa: E402
from tests.synthetic_batch import mixed_reward_batch  # noqa: E402

MIB = 2**20


def _hf_tensors(arch, dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    """Every HF tensor of `arch` (zeros of the right shape), in push order."""
    out = []
    for mapping in expand(arch):
        for name, shape in zip(mapping.hf, mapping.hf_shapes(arch)):
            out.append((name, torch.zeros(shape, dtype=dtype)))
    return out


def test_reload_unit_is_the_whole_transformer_layer():
    assert reload_unit("model.layers.3.self_attn.q_proj.weight") == "model.layers.3."
    assert reload_unit("model.layers.3.mlp.up_proj.weight") == "model.layers.3."
    assert reload_unit("model.layers.12.input_layernorm.weight") == "model.layers.12."
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert reload_unit(name) == name


@pytest.mark.parametrize("bucket_bytes", [1, MIB, 3 * MIB, 2**40])
def test_buckets_never_split_a_layer_and_keep_the_order(bucket_bytes):
    # hidden 256 / FFN 512: ~2.2 MB per layer, more than a 1 MiB bucket (the reproduction)
    arch = parse_hf_config(tiny_hf_config(hidden_size=256, intermediate_size=512, num_attention_heads=8))
    tensors = _hf_tensors(arch)
    groups = list(buckets(iter(tensors), bucket_bytes))
    assert [name for group in groups for name, _ in group] == [name for name, _ in tensors]
    where = {}
    for index, group in enumerate(groups):
        for name, _ in group:
            where.setdefault(reload_unit(name), set()).add(index)
    assert all(len(indices) == 1 for indices in where.values()), where
    for group in groups:
        size = sum(t.numel() * t.element_size() for _, t in group)
        units = {reload_unit(name) for name, _ in group}
        assert size <= bucket_bytes or len(units) == 1, (bucket_bytes, units, size)
    if bucket_bytes == 1:
        assert len(groups) == len(where)  # one unit per bucket
    if bucket_bytes == 2**40:
        assert len(groups) == 1


def test_layer_larger_than_the_bucket_goes_alone():
    arch = parse_hf_config(tiny_hf_config(hidden_size=256, intermediate_size=512, num_attention_heads=8))
    groups = list(buckets(iter(_hf_tensors(arch)), MIB))
    layer_groups = [g for g in groups if reload_unit(g[0][0]).startswith("model.layers.")]
    assert len(layer_groups) == arch.num_layers
    assert all(len({reload_unit(n) for n, _ in g}) == 1 and len(g) == 9 for g in layer_groups)


def test_logprob_mismatch_statistics_over_masked_positions():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    engine = torch.tensor([[-1.1, -2.0, -100.0], [-0.5, -0.45, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    stats = logprob_mismatch(trainer, engine, mask)
    diffs = [0.1, 0.0, 0.0, 0.2]
    assert stats.tokens == 4
    assert stats.mean == pytest.approx(sum(diffs) / 4)
    assert stats.max == pytest.approx(0.2)
    assert stats.mult_error == pytest.approx(sum(math.exp(d) for d in diffs) / 4)
    empty = logprob_mismatch(trainer, engine, torch.zeros_like(mask))
    assert empty == LogprobMismatch(mean=0.0, max=0.0, mult_error=1.0, tokens=0)


def test_check_mismatch_judges_the_mean_in_one_line():
    check_mismatch(LogprobMismatch(mean=1e-5, max=0.09, mult_error=1.0, tokens=500), 1e-3, "push")
    check_mismatch(LogprobMismatch(mean=0.0, max=0.0, mult_error=1.0, tokens=0), 1e-3, "push")
    with pytest.raises(WeightSyncError) as error:
        check_mismatch(LogprobMismatch(mean=0.02, max=0.5, mult_error=1.02, tokens=500), 1e-3, "weight push before step 7")
    message = str(error.value)
    assert "\n" not in message and "weight push before step 7" in message and "rollout.sync_check_atol" in message
    with pytest.raises(WeightSyncError):  # NaN never passes
        check_mismatch(LogprobMismatch(mean=float("nan"), max=float("nan"), mult_error=float("nan"), tokens=5), 1e-3, "x")


@pytest.mark.parametrize("multiple", [1, 2, 3, 8])
def test_pad_sequences_to_the_sequence_parallel_multiple(multiple):
    batch = mixed_reward_batch(seq_len=23)
    padded = pad_sequences(batch, multiple)
    seq = padded["tokens"].shape[1]
    assert seq % multiple == 0 and 23 <= seq < 23 + multiple
    for key, value in batch.items():
        if key == "rewards":
            assert torch.equal(padded[key], value)
            continue
        assert torch.equal(padded[key][:, :23], value), key
        if key == "position_ids":
            assert torch.equal(padded[key][0], torch.arange(seq))
        else:
            assert not padded[key][:, 23:].any(), key


@pytest.fixture()
def tiny_state():
    from rift_megatron.training.setup import OptimConfig, setup_training

    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    yield setup_training(parse_hf_config(tiny_hf_config()), ParallelLayout(), OptimConfig(lr=1e-2), total_steps=4)
    destroy_model_parallel()


def test_a_failing_check_stops_the_step_before_the_weights_move(tiny_state):
    from rift_megatron.training.step import train_step

    before = {n: p.detach().clone() for n, p in tiny_state.unwrapped_chunks()[0].named_parameters()}
    seen = {}

    def check(metrics):
        seen.update(metrics)
        raise WeightSyncError("planted")

    with pytest.raises(WeightSyncError, match="planted"):
        train_step(tiny_state, mixed_reward_batch(), LossSettings(), micro_batch_size=4, check=check)
    assert seen["response_tokens"] > 0 and "logprob_diff_mean" in seen and "token_mult_prob_error" in seen
    after = dict(tiny_state.unwrapped_chunks()[0].named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert tiny_state.step == 0
    metrics = train_step(tiny_state, mixed_reward_batch(), LossSettings(), micro_batch_size=4, check=lambda m: None)
    assert metrics["step"] == 1
    assert any(not torch.equal(before[n], p) for n, p in tiny_state.unwrapped_chunks()[0].named_parameters())


@pytest.mark.parametrize("layout,length", [(ParallelLayout(), 23), (ParallelLayout(tensor=2, sequence_parallel=True), 24)])
def test_a_batch_enters_the_trainer_on_the_platforms_device(monkeypatch, layout, length):
    """One place decides the device: prepare_batch pads for SP and moves every tensor there (the
    meta device stands in for a GPU: a CPU tensor left behind would show here)."""
    from types import SimpleNamespace

    from rift_megatron.platform import Platform
    from rift_megatron.training import step as step_module

    class Elsewhere(Platform):
        def device(self):
            return torch.device("meta")

    monkeypatch.setattr(step_module, "current_platform", lambda: Elsewhere(kind="cpu", backend="gloo"))
    state = SimpleNamespace(provider=SimpleNamespace(layout=layout))
    batch = step_module.prepare_batch(mixed_reward_batch(seq_len=23), state)
    assert all(t.device.type == "meta" for t in batch.values()), {k: t.device for k, t in batch.items()}
    assert batch["tokens"].shape[1] == length and batch["rewards"].shape == (8,)

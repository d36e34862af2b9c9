"""Trainer offload (issue 15 section 1) on the CPU proxy: the same code that frees GPU memory runs
host to host here, on real Megatron-Core state (DDP buffers, the distributed and the plain
optimizer, fp32 and bf16) in a one-process gloo world.

Checked: while offloaded every chosen storage holds 0 bytes (the memory is really released, not
just copied); a reload gives back every byte (parameters, Adam moments, fp32 main parameters;
gradients re-zeroed) through the same tensor objects; storages one part shares with another (the
fp32 main parameters of the distributed optimizer are views into the parameter buffer) are left
to their owner; and two optimizer steps with an offload and reload before, between and after
them give bit-identical losses, gradient norms, weights and optimizer state to the same steps
without. Same process, same kernels, same order of operations: any difference is a bug, so the
comparison is exact.
"""

from __future__ import annotations

import pytest
import torch

from rift_megatron.loss import LossSettings
from rift_megatron.models import parse_hf_config
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.models.provider import PrecisionConfig
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.training.offload import PARTS, OffloadParts, TrainerOffload
from rift_megatron.training.setup import OptimConfig, setup_training
from rift_megatron.training.step import train_step
from tests.synthetic_batch import mixed_reward_batch

STEPS = 2
ALL = OffloadParts(params=True, grads=True, optimizer=True)


def _build(dtype: str, distributed: bool):
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)  # reseeds: every build starts from the same weights
    return setup_training(parse_hf_config(tiny_hf_config()), ParallelLayout(),
                          OptimConfig(lr=1e-2, use_distributed_optimizer=distributed),
                          PrecisionConfig(dtype=dtype), total_steps=STEPS)


def _snapshot(state) -> dict[str, torch.Tensor]:
    """Every value training depends on: parameters, gradient buffers, optimizer tensors."""
    out = {f"param.{name}": p.detach().clone() for name, p in state.model[0].named_parameters()}
    for i, buffer in enumerate(state.model[0].buffers):
        out[f"grad_buffer.{i}"] = buffer.grad_data.clone()
    inner = state.optimizer.chained_optimizers[0].optimizer if hasattr(state.optimizer, "chained_optimizers") \
        else state.optimizer.optimizer
    for g, group in enumerate(inner.param_groups):
        for i, param in enumerate(group["params"]):
            out[f"main.{g}.{i}"] = param.detach().clone()
            for key, value in inner.state.get(param, {}).items():
                if torch.is_tensor(value):
                    out[f"state.{g}.{i}.{key}"] = value.clone()
    return out


def _assert_equal(ours: dict, reference: dict, what: str) -> None:
    assert ours.keys() == reference.keys(), what
    different = [key for key in reference if not torch.equal(ours[key], reference[key])]
    assert not different, f"{what}: {different[:5]}"


def _offload_and_check(offload: TrainerOffload) -> None:
    """Offload, check what was released and what was not, reload, check every byte came back."""
    state = offload.state
    before = _snapshot(state)
    storages = offload.storages()
    assert storages["params"] and storages["grads"]
    offload.offload()
    for part in PARTS:
        sizes = [s.nbytes() for s in storages[part]]
        chosen = getattr(offload.parts, part)
        assert all(size == 0 for size in sizes) if chosen else all(size > 0 for size in sizes), (part, sizes)
    if offload.parts.params:  # the parameters themselves (views into the DDP buffer) are empty
        assert all(p.untyped_storage().nbytes() == 0 for p in state.model[0].parameters())
    if offload.parts.grads:
        assert all(b.grad_data.untyped_storage().nbytes() == 0 for b in state.model[0].buffers)
    offload.reload()
    assert all(s.nbytes() > 0 for part in PARTS for s in storages[part])
    after = _snapshot(state)
    if offload.parts.grads:  # dead between steps: freed and re-zeroed, not copied
        for key in [k for k in before if k.startswith("grad_buffer.")]:
            assert not after[key].any(), key
            after[key] = before[key]
    _assert_equal(after, before, "after a reload")


def _train(dtype: str, distributed: bool, parts: OffloadParts | None) -> tuple[list[dict], dict]:
    state = _build(dtype, distributed)
    batch = mixed_reward_batch(seed=7)
    offload = TrainerOffload(state, parts) if parts else None
    history = []
    try:
        for _ in range(STEPS):
            if offload:
                _offload_and_check(offload)
            history.append(train_step(state, batch, LossSettings(), micro_batch_size=4))
        final = _snapshot(state)
        if offload:
            _offload_and_check(offload)
        return history, final
    finally:
        destroy_model_parallel()


_REFERENCES: dict = {}


def _reference(dtype: str, distributed: bool):
    if (dtype, distributed) not in _REFERENCES:
        _REFERENCES[dtype, distributed] = _train(dtype, distributed, None)
    return _REFERENCES[dtype, distributed]


@pytest.mark.parametrize(("dtype", "distributed", "parts"), [
    ("fp32", True, ALL),
    # fp32 + distributed optimizer: the optimizer's main parameters ARE the parameter buffer;
    # offloading only the optimizer must take Adam's moments and leave that buffer in place.
    ("fp32", True, OffloadParts(optimizer=True)),
    ("bf16", True, ALL),  # separate fp32 main parameters, owned by the optimizer part
    ("fp32", False, OffloadParts(params=True, grads=True)),  # no parameter buffer: per-parameter storages
], ids=["fp32-distopt-all", "fp32-distopt-optimizer-only", "bf16-distopt-all", "fp32-plain-params-grads"])
def test_offload_between_steps_releases_storage_and_trains_identically(dtype, distributed, parts):
    history, final = _train(dtype, distributed, parts)
    ref_history, ref_final = _reference(dtype, distributed)
    for step, (ours, ref) in enumerate(zip(history, ref_history, strict=True)):
        assert ours == ref, f"step {step + 1}: {ours} != {ref}"
    _assert_equal(final, ref_final, "final state vs no offload")
    assert history[-1]["loss"] != history[0]["loss"] and ref_final.keys() == final.keys()  # the steps trained


def test_offload_parts_claim_every_storage_once():
    """bf16 + distributed optimizer: parameters, gradient buffers and the optimizer's fp32 main
    parameters and moments are distinct storages, each listed by exactly one part."""
    state = _build("bf16", True)
    try:
        train_step(state, mixed_reward_batch(seed=7), LossSettings(), micro_batch_size=4)  # creates Adam's state
        storages = TrainerOffload(state, ALL).storages()
        pointers = [s.data_ptr() for part in PARTS for s in storages[part]]
        assert len(pointers) == len(set(pointers))
        buffer = state.model[0].buffers[0]
        assert [s.data_ptr() for s in storages["params"]] == [buffer.param_data.untyped_storage().data_ptr()]
        assert [s.data_ptr() for s in storages["grads"]] == [buffer.grad_data.untyped_storage().data_ptr()]
        # main parameter + exp_avg + exp_avg_sq (+ step) per optimizer parameter
        assert len(storages["optimizer"]) >= 3 * len(state.optimizer.chained_optimizers[0].optimizer.param_groups[0]["params"])
    finally:
        destroy_model_parallel()

"""Fast kernels, communication overlap and activation recomputation (issue 15, section 4).

The option table is decided from facts (platform, layer implementation, importable kernel
packages, layout, optimizer) by `performance_options`, so each platform's table is asserted here
without its hardware; the CUDA tables are applied for real only on a GPU (bench/gpu_check.py).
Recomputation runs for real: one process, the tiny model in fp32, two optimizer steps with
selective and full recomputation against none, from the same seeded weights.
"""

from __future__ import annotations

import os

import pytest
import torch

from rift_megatron.loss import LossSettings
from rift_megatron.models import parse_hf_config
from rift_megatron.models.performance import (
    KernelPackages,
    OverlapConfigError,
    OverlapRequest,
    apply_launch_environment,
    performance_options,
)
from rift_megatron.models.presets import tiny_hf_config
from rift_megatron.models.provider import GPTModelProvider, RecomputeConfig
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
from rift_megatron.platform import Platform
from rift_megatron.training.setup import OptimConfig, setup_training
from rift_megatron.training.step import train_step
from tests.synthetic_batch import mixed_reward_batch

CPU = Platform(kind="cpu", backend="gloo")
CUDA = Platform(kind="cuda", backend="nccl")
NOTHING = KernelPackages()
TE = KernelPackages(transformer_engine=True)
TE_AND_APEX = KernelPackages(transformer_engine=True, apex_fused_wgrad=True, apex_masked_softmax=True)
FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
           "masked_softmax_fusion", "persist_layer_norm", "tp_comm_overlap")


def table(platform, layer_impl, packages, layout=ParallelLayout(), distributed_optimizer=True, **overlap):
    return performance_options(platform, layer_impl, layout, packages, distributed_optimizer, OverlapRequest(**overlap))


def test_cpu_keeps_plain_pytorch_math_whatever_is_installed():
    for packages in (NOTHING, TE_AND_APEX):
        options = table(CPU, "local", packages, ParallelLayout(tensor=2))
        assert not any(getattr(options, name) for name in FUSIONS), options.table()
        assert options.attention == "local (unfused PyTorch)"
        assert (options.overlap_grad_reduce, options.overlap_param_gather) == (False, False)
        assert options.cuda_device_max_connections is None


def test_cuda_with_transformer_engine_turns_on_what_megatron_lm_users_get():
    options = table(CUDA, "transformer_engine", TE)
    print(options.table())
    on = {name for name in FUSIONS if getattr(options, name)}
    assert on == {"bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"}
    assert options.attention == "transformer_engine (flash / cuDNN fused)"
    assert options.overlap_grad_reduce and options.overlap_param_gather
    # gradient_accumulation_fusion needs apex even with TE layers (the output layer is Megatron's own).
    assert table(CUDA, "transformer_engine", TE_AND_APEX).gradient_accumulation_fusion
    # masked_softmax_fusion is the local attention's kernel: TE's attention does not use it.
    assert not table(CUDA, "transformer_engine", TE_AND_APEX).masked_softmax_fusion


def test_cuda_without_transformer_engine_uses_what_local_layers_support():
    options = table(CUDA, "local", NOTHING)
    on = {name for name in FUSIONS if getattr(options, name)}
    assert on == {"bias_activation_fusion", "bias_dropout_fusion"}  # torch.compile'd, no TE needed
    assert options.attention == "local (unfused PyTorch)"
    with_apex = table(CUDA, "local", KernelPackages(apex_fused_wgrad=True, apex_masked_softmax=True))
    assert with_apex.gradient_accumulation_fusion and with_apex.masked_softmax_fusion
    # TE installed but local layers chosen: TE's RoPE kernel still serves the local attention.
    assert table(CUDA, "local", TE).apply_rope_fusion


def test_overlaps_follow_the_optimizer_and_the_user():
    assert not table(CUDA, "local", NOTHING, distributed_optimizer=False).overlap_param_gather
    assert table(CUDA, "local", NOTHING, distributed_optimizer=False).overlap_grad_reduce
    off = table(CUDA, "local", NOTHING, grad_reduce=False)
    assert (off.overlap_grad_reduce, off.overlap_param_gather) == (False, False)
    forced = table(CPU, "local", NOTHING, param_gather=True)  # implies the grad reduce overlap
    assert (forced.overlap_grad_reduce, forced.overlap_param_gather) == (True, True)
    assert table(CPU, "local", NOTHING, ParallelLayout(pipeline=2), param_gather=True).align_param_gather
    assert not forced.align_param_gather
    with pytest.raises(OverlapConfigError, match="overlap_param_gather needs optim.use_distributed_optimizer"):
        table(CUDA, "local", NOTHING, distributed_optimizer=False, param_gather=True)
    with pytest.raises(OverlapConfigError, match="overlap_param_gather needs parallel.overlap_grad_reduce"):
        table(CUDA, "local", NOTHING, grad_reduce=False, param_gather=True)


@pytest.mark.parametrize("platform, tensor, expected", [
    (CUDA, 2, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}),
    (CUDA, 1, {}),
    (CPU, 2, {}),
])
def test_cuda_device_max_connections_is_set_with_tensor_parallelism_on_cuda(platform, tensor, expected):
    environ = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"} if expected else {}
    assert apply_launch_environment(platform, ParallelLayout(tensor=tensor), environ) == expected
    assert environ == (expected or {})


def test_rift_train_applies_the_launch_environment_of_the_cuda_decision(monkeypatch):
    """`rift train` (train.run, before it builds the trainer and CUDA starts) applies the decision above."""
    import rift_megatron.platform.device as device
    from rift_megatron import train
    from rift_megatron.config import load_config

    monkeypatch.setattr(device, "detect_platform", lambda: CUDA)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    train._set_launch_environment(load_config(None, ["parallel.tensor=2"]))
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_the_cpu_model_config_carries_the_cpu_table():
    provider = GPTModelProvider(parse_hf_config(tiny_hf_config()), ParallelLayout(), platform=CPU)
    assert provider.options == table(CPU, "local", KernelPackages.detect(), distributed_optimizer=True)
    for name, value in provider.options.transformer_config_fields().items():
        assert getattr(provider.config, name) is value is False, name
    assert provider.config.recompute_granularity is None


# name: (config, forward calls per micro-batch of each of the 4 layers and of each core attention
# in a training step: 2 where the backward pass reruns it)
RECOMPUTE = {
    "none": (RecomputeConfig(), [1, 1, 1, 1], [1, 1, 1, 1]),
    "selective": (RecomputeConfig("selective"), [1, 1, 1, 1], [2, 2, 2, 2]),
    "full_uniform_2": (RecomputeConfig("full", "uniform", 2), [2, 2, 2, 2], [2, 2, 2, 2]),
    "full_block_3": (RecomputeConfig("full", "block", 3), [2, 2, 2, 1], [2, 2, 2, 1]),
}
MICRO_BATCHES = 2


def _count_forwards(modules: list[torch.nn.Module]) -> list[int]:
    counts = [0] * len(modules)

    def counter(index: int):
        def hook(*_):
            counts[index] += 1
        return hook

    for index, module in enumerate(modules):
        module.register_forward_hook(counter(index))
    return counts


def _train_two_steps(recompute: RecomputeConfig):
    """Losses, first-step gradients, final weights, and forward calls per layer / core attention
    in the first step."""
    init_model_parallel(ParallelLayout(), seed=1234)
    try:
        state = setup_training(parse_hf_config(tiny_hf_config()), ParallelLayout(), OptimConfig(lr=1e-3),
                               total_steps=2, recompute=recompute)
        assert state.config.recompute_granularity == (None if recompute.granularity == "none" else recompute.granularity)
        grads = {}
        layers = state.model[0].module.decoder.layers
        layer_calls = _count_forwards(list(layers))
        attention_calls = _count_forwards([layer.self_attention.core_attention for layer in layers])
        calls = []

        def keep_gradients(metrics: dict) -> None:
            grads.update({name: p.main_grad.clone() for name, p in state.model[0].module.named_parameters()})
            calls.extend([[n // MICRO_BATCHES for n in layer_calls], [n // MICRO_BATCHES for n in attention_calls]])

        batch = mixed_reward_batch()
        history = [train_step(state, batch, LossSettings(), micro_batch_size=4, check=keep_gradients if step == 0 else None)
                   for step in range(2)]
        weights = {name: p.detach().clone() for name, p in state.unwrapped_chunks()[0].named_parameters()}
        return history, grads, weights, calls
    finally:
        destroy_model_parallel()


def test_recompute_trains_exactly_like_no_recompute():
    """Recomputation reruns the same forward ops on the same inputs in the backward pass: losses,
    gradients and updated weights must equal those without it (fp32; asserted to 1e-6 relative,
    measured identical)."""
    init_distributed()
    runs = {name: _train_two_steps(recompute) for name, (recompute, _, _) in RECOMPUTE.items()}
    for name, (_, layer_calls, attention_calls) in RECOMPUTE.items():
        assert runs[name][3] == [layer_calls, attention_calls], name  # the recomputation really ran
    base_history, base_grads, base_weights, _ = runs.pop("none")
    assert base_history[1]["loss"] != base_history[0]["loss"]  # the weights moved between the steps
    for name, (history, grads, weights, _) in runs.items():
        for ours, ref in zip(history, base_history, strict=True):
            for key in ("loss", "loss_pos", "loss_neg", "grad_norm"):
                assert ours[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (name, key)
        for tensors, reference in ((grads, base_grads), (weights, base_weights)):
            assert tensors.keys() == reference.keys()
            worst = max(float((tensors[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30))
                        for k in reference)
            assert worst <= 1e-6, (name, worst)


def _bytes_kept_for_backward(recompute: RecomputeConfig) -> int:
    """Bytes of the distinct tensors one training-mode forward pass saves for the backward pass
    (weights included, the same in every variant): the activation memory recomputation trades."""
    init_model_parallel(ParallelLayout(), seed=1234)
    try:
        model = GPTModelProvider(parse_hf_config(tiny_hf_config()), ParallelLayout(), recompute=recompute)()
        model.train()
        batch = mixed_reward_batch(seq_len=64)
        kept: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(batch["tokens"], batch["position_ids"], None)
        return sum(kept.values())
    finally:
        destroy_model_parallel()


def test_recompute_keeps_less_for_the_backward_pass():
    init_distributed()
    kept = {name: _bytes_kept_for_backward(recompute) for name, (recompute, _, _) in RECOMPUTE.items()}
    print(kept)
    assert kept["full_uniform_2"] < kept["full_block_3"] < kept["selective"] < kept["none"], kept

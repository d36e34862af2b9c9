"""Megatron's gradients themselves, not only what Adam makes of them (issue 13).

Adam's first update is lr x sign(g): comparing weights after Adam steps cannot see a gradient
scaled by 2 (Z divided twice, a norm gradient all-reduced twice). Here the gradient Megatron's
DDP holds after the schedule (`main_grad`, already divided by the global token count) is compared
with an independent one: `transformers`' model in float64, its log-probs of the same targets, and
the loss's gradient dL/dl derived by hand in tests/unit/loss_reference.py, back-propagated by
autograd; HF gradients are mapped to Megatron's fused layout with the conversion table's
`to_megatron` (a linear re-arrangement, so it maps gradients as it maps weights).

Tolerance: Megatron runs in float32 against a float64 reference; differences are fp32 round-off
(measured: max |diff| / max |grad| <= 2.2e-6 over all tensors and settings). 1e-4 of each tensor's largest gradient
entry is far below a scale error (a factor 2 is 1.0 of it) or a missing term.
"""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from rift_megatron.convert.mapping import expand  # noqa: E402
from rift_megatron.loss import LossSettings  # noqa: E402
from rift_megatron.models.param_names import named_checkpoint_parameters  # noqa: E402
from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel  # noqa: E402
from tests.unit.loss_reference import reference_loss_and_grad  # noqa: E402
from tests.synthetic_batch import mixed_reward_batch  # noqa: E402

RTOL = 1e-4
SETTINGS = {
    "rift-global": LossSettings(algorithm="rift"),
    "rift-per_sign": LossSettings(algorithm="rift", normalization="per_sign"),
    "naive": LossSettings(algorithm="naive"),
}
FAMILIES = ("llama", "qwen2")  # llama3 rope; qkv bias + tied embeddings (tests/unit/test_convert.py's zoo)


def _reference_grads(model, batch, settings: LossSettings, arch) -> dict[str, torch.Tensor]:
    """dL/dtheta in float64 through transformers, mapped to Megatron's parameter layout."""
    model.zero_grad()
    logits = model(batch["tokens"], position_ids=batch["position_ids"]).logits
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch["targets"][..., None])[..., 0]
    _, dl, _ = reference_loss_and_grad(
        logprobs.tolist(), batch["behavior_logprobs"].double().tolist(), batch["rewards"].tolist(),
        (batch["loss_mask"] != 0).int().tolist(), algorithm=settings.algorithm, normalization=settings.normalization,
    )
    logprobs.backward(torch.tensor(dl, dtype=torch.float64))
    hf_grads = {name: param.grad for name, param in model.named_parameters()}
    if arch.tie_word_embeddings:
        hf_grads.pop("lm_head.weight", None)  # the same parameter as the embedding
    return {m.megatron: m.to_megatron([hf_grads[name] for name in m.hf], arch) for m in expand(arch)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_megatron_gradients_equal_autograd_through_transformers(tmp_path, family, setting):
    from transformers import AutoModelForCausalLM

    from rift_megatron.convert.checkpoint_files import load_architecture
    from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from rift_megatron.training.setup import OptimConfig, setup_training
    from rift_megatron.training.step import train_step
    from tests.unit.test_convert import build_hf_model

    hf_dir = build_hf_model(tmp_path / "hf", family, shard=None)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        convert_hf_to_mcore(hf_dir, tmp_path / "mcore")
        arch = load_architecture(hf_dir)
        state = setup_training(arch, ParallelLayout(), OptimConfig(lr=1e-3, clip_grad=0.0, use_distributed_optimizer=False),
                               initial_weights=tmp_path / "mcore")
        batch = mixed_reward_batch(seed=3, vocab_size=arch.vocab_size)
        grads = {}

        def capture(metrics):
            for name, param in named_checkpoint_parameters(state.unwrapped_chunks()).items():
                grads[name] = param.main_grad.detach().clone()

        train_step(state, batch, SETTINGS[setting], micro_batch_size=2, check=capture)
    finally:
        destroy_model_parallel()
    reference = _reference_grads(model, batch, SETTINGS[setting], arch)
    assert grads.keys() >= reference.keys()
    worst = {}
    for name, expected in reference.items():
        got = grads[name].double().reshape(expected.shape)
        scale = expected.abs().max().item()
        assert scale > 0, name
        worst[name] = (got - expected).abs().max().item() / scale
    assert max(worst.values()) <= RTOL, sorted(worst.items(), key=lambda item: -item[1])[:5]

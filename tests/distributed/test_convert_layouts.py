"""Converted checkpoints in the real Megatron model at TP1, TP2, PP2 and TP2xPP2 (gloo processes),
training checkpoints saved at TP2xPP2 vs TP1 exported back to HF, and `rift convert verify`
(also `--layers N`, the logits check on the first N layers that lets it run on a 70B model).

One torchrun launch (4 processes, tests/distributed/convert_worker.py) does all Megatron work for
the three model families of tests/unit/test_convert.py (Llama + llama3 rope, Qwen2 + qkv bias +
tied embeddings, Mistral + GQA + live sliding window; vocab 1001/999, padded to 1024) plus a
Llama checkpoint written in row blocks; two more launches come from `verify` itself.

Tolerances:
* Logits, Megatron (fp32) vs transformers (fp32) on the same 2 x 64 tokens: max |diff| <= 1e-4
  and top-1 agreement 1.0. Both run the same math in different kernel orders (fused QKV, TP
  all-reduces, pipeline send/recv), so the difference is fp32 round-off: measured ~6e-7 on these
  4-layer models (verify.py's docstring). 1e-4 is ~100x that and still far below what a wrong
  mapping causes; `test_each_feature_moves_the_logits_far_beyond_the_tolerance` proves this for
  each feature by showing that dropping it (llama3 scaling, q/k/v biases, the sliding window)
  changes the logits by more than 100x the tolerance.
* Training checkpoints without training: bit-identical to the source HF tensors at both layouts.
  After one Adam step (lr 2e-5; Qwen2) at TP2xPP2 and at TP1 (DP4) on the same global batch: exports
  agree to 1e-6 (5% of lr, the parallel-equivalence convention: the layouts reduce gradients in
  a different order and Adam's first step, lr * g / (|g| + eps), amplifies ulp noise of tiny
  gradients; measured 1.7-2.1e-6 at lr 1e-4, i.e. ~2% of lr), while every tensor moved by about
  lr (asserted >= lr / 2) so the comparison is not vacuous. Losses agree to 1e-5 relative.
* `verify --layers 2` on a 4-layer Llama: a checkpoint with two query heads of one layer swapped
  (a realistic mapping error) moves the 2-layer logits by 0.02-0.03 (measured for layers 0 and
  1), 20-30x verify's default tolerance of 1e-3, so the logits part must fail for layers 0 and 1;
  for layer 3 (not compared) the logits must stay within LOGITS_ATOL while the tensor part fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rift_megatron.convert.checkpoint_files import HF_ASSETS
from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from rift_megatron.convert.mcore_to_hf import convert_mcore_to_hf
from rift_megatron.convert.verify import DEFAULT_ATOL, _fixed_tokens, transformers_logits
from tests.distributed import convert_worker
from tests.distributed.launch import REPO_ROOT, run_torchrun
from tests.environment import subprocess_env
from tests.unit.test_convert import (
    FAMILY_CONFIGS,
    FAMILY_NAMES,
    assert_bit_identical,
    build_hf_model,
    config_of,
    read_hf_tensors,
    rewrite_tensors,
)

pytestmark = pytest.mark.distributed

WORKER = Path(convert_worker.__file__)
LOGITS_ATOL = 1e-4
TRAINED_ATOL = 0.05 * convert_worker.TRAIN_LR  # 1e-6
LAYOUTS = [f"tp{tp}pp{pp}" for tp, pp in convert_worker.LOGIT_LAYOUTS]
# The checkpoints the worker loads: each family, and Llama written in 32 KB row blocks (which
# only needs the most sharded layout: TP1 loading is covered by the unit tests).
CHECKPOINTS = (*FAMILY_NAMES, "llama-blocks")
LOGIT_CASES = [(name, layout) for name in FAMILY_NAMES for layout in LAYOUTS] + [("llama-blocks", "tp2pp2")]
# One training step costs two more setups per family: done for the hardest case, Qwen2 (tied
# embeddings, whose two copies live on different pipeline stages at PP2, and q/k/v biases).
TRAINED = ("qwen2",)


def _tokens(family: str) -> torch.Tensor:
    return _fixed_tokens(FAMILY_CONFIGS[family]["vocab_size"], batch=2, seq=64)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Build, convert, and run the worker once; returns the paths the tests read."""
    from rift_megatron.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("convert_layouts")
    hf, ckpt = {}, {}
    for family in FAMILY_NAMES:
        hf[family] = build_hf_model(root / f"{family}-hf", family)
        ckpt[family] = convert_hf_to_mcore(hf[family], root / f"{family}-ckpt")
    hf["llama-blocks"] = hf["llama"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_to_mcore, "STREAM_BLOCK_BYTES", 32 * 1024)
        ckpt["llama-blocks"] = convert_hf_to_mcore(hf["llama"], root / "llama-blocks-ckpt")
    jobs = []
    for name in CHECKPOINTS:
        tokens = root / f"{name}-tokens.pt"
        torch.save(_tokens(name.split("-")[0]), tokens)
        jobs.append({"ckpt": str(ckpt[name]), "out": str(root / f"{name}-out"), "tokens": str(tokens),
                     "layouts": convert_worker.LOGIT_LAYOUTS if name in FAMILY_NAMES else [(2, 2)],
                     "save": name in FAMILY_NAMES, "train": name in TRAINED})
    run_torchrun(WORKER, 4, {"jobs": jobs}, root)
    return {"root": root, "hf": hf, "ckpt": ckpt, "out": {name: root / f"{name}-out" for name in CHECKPOINTS}}


@pytest.fixture(scope="module")
def reference_logits(work) -> dict[str, torch.Tensor]:
    return {family: transformers_logits(work["hf"][family], _tokens(family)) for family in FAMILY_NAMES}


@pytest.mark.parametrize(("name", "layout"), LOGIT_CASES)
def test_megatron_logits_match_transformers(work, reference_logits, name, layout):
    ours = torch.load(work["out"][name] / f"logits-{layout}.pt")
    reference = reference_logits[name.split("-")[0]]
    assert ours.shape == reference.shape  # vocabulary padding stripped: [2, 64, 1001 or 999]
    diff = (ours - reference).abs().max().item()
    agreement = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert diff <= LOGITS_ATOL, f"{name} at {layout}: max |logit diff| {diff:.3g}"
    assert agreement == 1.0, f"{name} at {layout}: top-1 agreement {agreement}"


def _ablated_logits(family: str, hf_dir: Path) -> torch.Tensor:
    """transformers logits of the same weights with the family's special feature removed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    if family == "llama":
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    elif family == "mistral":
        config.sliding_window = None
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32).eval()
    if family == "qwen2":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    param.zero_()
    with torch.no_grad():
        return model(_tokens(family)).logits


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_feature_moves_the_logits_far_beyond_the_tolerance(work, reference_logits, family):
    """Power of the logits check: Megatron's logits are far from the model without the feature
    (llama3 rope scaling / q/k/v biases / sliding window), so the match above really covers it."""
    ablated = _ablated_logits(family, work["hf"][family])
    assert (ablated - reference_logits[family]).abs().max().item() > 100 * LOGITS_ATOL
    megatron = torch.load(work["out"][family] / "logits-tp2pp2.pt")
    assert (megatron - ablated).abs().max().item() > 100 * LOGITS_ATOL


def _export(work, family: str, name: str) -> Path:
    out = work["root"] / f"{family}-{name}-hf"
    if not out.exists():
        convert_mcore_to_hf(work["out"][family] / name, out)
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_checkpoints_saved_at_tp2pp2_and_tp1_export_to_the_source_model(work, family):
    source = read_hf_tensors(work["hf"][family])
    for layout in ("tp2pp2", "tp1pp1"):
        assert (work["out"][family] / f"step0-{layout}" / HF_ASSETS / "config.json").is_file()
        export = _export(work, family, f"step0-{layout}")
        assert_bit_identical(read_hf_tensors(export), source)
        assert config_of(export) == config_of(work["hf"][family])


@pytest.mark.parametrize("family", TRAINED)
def test_one_training_step_at_tp2pp2_exports_like_tp1(work, family):
    out = work["out"][family]
    metrics = {layout: json.loads((out / f"step1-{layout}.json").read_text()) for layout in ("tp2pp2", "tp1pp1")}
    assert metrics["tp2pp2"]["skipped"] == 0 and metrics["tp2pp2"]["tokens"] == metrics["tp1pp1"]["tokens"] > 0
    for key in ("loss", "loss_pos", "loss_neg", "grad_norm"):
        assert metrics["tp2pp2"][key] == pytest.approx(metrics["tp1pp1"][key], rel=1e-5, abs=1e-7), key

    source = read_hf_tensors(work["hf"][family])
    pp = read_hf_tensors(_export(work, family, "step1-tp2pp2"))
    tp1 = read_hf_tensors(_export(work, family, "step1-tp1pp1"))
    assert sorted(pp) == sorted(tp1) == sorted(source)
    worst = max(((pp[k] - tp1[k]).abs().max().item(), k) for k in source)
    assert worst[0] <= TRAINED_ATOL, f"{worst[1]} differs by {worst[0]:.3g} between TP2xPP2 and TP1"
    for name in source:
        assert pp[name].dtype == source[name].dtype
        moved = (tp1[name] - source[name]).abs().max().item()
        assert moved >= 0.5 * convert_worker.TRAIN_LR, f"{name} moved only {moved:.3g} in one step"


def _verify(hf: Path, ckpt: Path, report: Path, *extra: str) -> subprocess.CompletedProcess:
    env = subprocess_env(PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "rift_megatron.cli", "convert", "verify", "--hf", str(hf), "--ckpt", str(ckpt),
               "--json", str(report), *extra]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_verify_passes_at_tp2_pp2(work):
    """`rift convert verify --tp 2 --pp 2` on the tied Qwen2 model (tied head on another stage)."""
    hf, report_path = work["hf"]["qwen2"], work["root"] / "verify-pass.json"
    result = _verify(hf, work["ckpt"]["qwen2"], report_path, "--tp", "2", "--pp", "2")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().splitlines()[-1] == "PASS"
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and not report["mismatched"]
    assert report["tensors_checked"] == report["tensors_exact"] == len(read_hf_tensors(hf))
    assert (report["logits"]["tp"], report["logits"]["pp"]) == (2, 2)
    assert report["logits"]["max_abs_diff"] <= LOGITS_ATOL
    assert report["logits"]["top1_agreement"] == 1.0


def test_verify_fails_against_a_different_model_of_the_same_shape(work):
    other = build_hf_model(work["root"] / "llama-other-hf", "llama", seed=1)
    report_path = work["root"] / "verify-fail.json"
    result = _verify(other, work["ckpt"]["llama"], report_path)
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().splitlines()[-1] == "FAIL"
    assert "MISMATCH model.embed_tokens.weight" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    assert report["tensors_checked"] == len(read_hf_tensors(other))
    assert {m["name"] for m in report["mismatched"]} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert report["logits"]["max_abs_diff"] > report["logits"]["atol"]


# --------------------------------------------------------------------------------------------
# verify --layers N
# --------------------------------------------------------------------------------------------

CORRUPTED_LAYERS = (0, 1, 3)


def _swapped_heads(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def first_layers(tmp_path_factory) -> dict:
    """A 4-layer Llama, its checkpoint, and checkpoints of copies with query heads 0 and 1 of
    one layer swapped (each a checkpoint that no longer holds the source model)."""
    root = tmp_path_factory.mktemp("verify_layers")
    hf = build_hf_model(root / "llama-hf", "llama")
    ckpt = {"good": convert_hf_to_mcore(hf, root / "ckpt")}
    head_dim = FAMILY_CONFIGS["llama"]["hidden_size"] // FAMILY_CONFIGS["llama"]["num_attention_heads"]
    for layer in CORRUPTED_LAYERS:
        def swap(tensors, name=_swapped_heads(layer)):
            weight = tensors[name]
            weight[: 2 * head_dim] = torch.cat([weight[head_dim : 2 * head_dim], weight[:head_dim]])

        bad = Path(shutil.copytree(hf, root / f"llama-hf-bad{layer}"))
        rewrite_tensors(bad, swap)
        ckpt[layer] = convert_hf_to_mcore(bad, root / f"ckpt-bad{layer}")
    return {"root": root, "hf": hf, "ckpt": ckpt}


def test_verify_first_two_layers_passes_at_pp2(first_layers):
    """`verify --layers 2 --pp 2`: each stage builds one of the two layers and loads it from the
    4-layer checkpoint; the report says what was compared."""
    report_path = first_layers["root"] / "layers-pass.json"
    result = _verify(first_layers["hf"], first_layers["ckpt"]["good"], report_path, "--layers", "2", "--pp", "2")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().splitlines()[-1] == "PASS"
    assert "logits (first 2 of 4 layers) at TP1 PP2" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["layers_compared"] == 2 and report["num_layers"] == 4
    assert report["tensors_checked"] == report["tensors_exact"] == len(read_hf_tensors(first_layers["hf"]))
    assert (report["logits"]["tp"], report["logits"]["pp"]) == (1, 2)
    assert report["logits"]["max_abs_diff"] <= LOGITS_ATOL and report["logits"]["top1_agreement"] == 1.0
    assert any("first 2 of 4 layers + final norm + LM head" in line for line in report["checked"])
    assert any("layers 2-3" in line and "bit-exact tensor check only" in line for line in report["checked"])


@pytest.mark.parametrize(("layer", "layout"), [(0, ("--tp", "1")), (1, ("--pp", "2"))], ids=["layer0-tp1", "layer1-pp2"])
def test_verify_first_two_layers_fails_for_a_corrupted_compared_layer(first_layers, layer, layout):
    """Both parts fail: the tensor check names the tensor, and the logits of the truncated models
    differ beyond the tolerance (layer 1 at PP2 sits on the second stage)."""
    report_path = first_layers["root"] / f"layers-fail{layer}.json"
    result = _verify(first_layers["hf"], first_layers["ckpt"][layer], report_path, "--layers", "2", *layout)
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.strip().splitlines()[-1] == "FAIL"
    report = json.loads(report_path.read_text())
    assert report["passed"] is False and report["layers_compared"] == 2
    assert [m["name"] for m in report["mismatched"]] == [_swapped_heads(layer)]
    assert report["logits"]["max_abs_diff"] > DEFAULT_ATOL, report["logits"]


def test_verify_first_two_layers_leaves_later_layers_to_the_tensor_check(first_layers):
    """Layer 3 is not in the 2-layer logits (they match), but the bit-exact check still covers
    it, so verify fails: what --layers skips in the forward pass is still compared."""
    report_path = first_layers["root"] / "layers-fail3.json"
    result = _verify(first_layers["hf"], first_layers["ckpt"][3], report_path, "--layers", "2")
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    assert [m["name"] for m in report["mismatched"]] == [_swapped_heads(3)]
    assert report["logits"]["max_abs_diff"] <= LOGITS_ATOL and report["logits"]["top1_agreement"] == 1.0

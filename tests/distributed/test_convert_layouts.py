"""Converted checkpoints in the real Megatron model at TP1, TP2, PP2 and TP2xPP2 (gloo processes),
training checkpoints saved at TP2xPP2 vs TP1 exported back to HF, and `rift convert verify`.

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
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rift_megatron.convert.checkpoint_files import HF_ASSETS
from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from rift_megatron.convert.mcore_to_hf import convert_mcore_to_hf
from rift_megatron.convert.verify import _fixed_tokens, transformers_logits
from tests.distributed import convert_worker
from tests.distributed.launch import REPO_ROOT, run_torchrun
from tests.unit.test_convert import (
    FAMILY_CONFIGS,
    FAMILY_NAMES,
    assert_bit_identical,
    build_hf_model,
    config_of,
    read_hf_tensors,
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
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
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

"""The verdicts the GPU check's numbers are judged by: per-step metrics of two runs (GPU vs CPU,
with the tolerance and why it is what it is), whether a run's metrics show real optimizer steps on
the right platform, tokens/s of a step, a bit-exact comparison of two HF folders, and whether the
trainer offload released and restored what it should (`offload_problems`). Pure
functions of what the runs wrote (unit-tested in tests/unit/test_gpu_check.py)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Per-step relative tolerance GPU (fp32, TF32 off) vs CPU (fp32). Both compute the same
# function with different kernels (cuBLAS vs oneDNN/MKL GEMMs, other reduction trees in softmax,
# RMSNorm and the vocabulary log-softmax): a few fp32 ulps per sum (~1e-7..1e-6 relative), which
# Adam's per-weight normalisation carries into the next steps. What that kind of difference does
# here was measured on this model (CPU, 2026-12-06): the same run in micro-batches of 2 instead of
# 4 (same math, other GEMM shapes and accumulation order) moved the loss by <= 5.6e-8 and the
# gradient norm by <= 5.2e-7 over the 5 steps; cpu_noise_reference repeats that in every run.
# Faults measured the same way: the initial weights rounded to TF32's 10 mantissa bits (what TF32
# does to one operand of each matmul; real TF32 rounds both, in every matmul) moved the gradient
# norm by 1.2e-4..5.0e-4 at every step (the loss by <= 5.7e-6: near a uniform distribution the
# loss is dominated by ln(vocab)); training in bf16 moved the loss by 3.5e-5 and the gradient norm
# by 3.6e-3; a masking or normalisation bug moves both by O(1). Hence: gradient norm 1e-4 (200x
# the measured round-off, so GPU kernels may be 10-100x noisier than the CPU's reordering, and
# below the TF32 proxy at every step) and loss 2e-5 (360x the round-off, below bf16's effect).
PARITY_RTOL: dict[str, float] = {"loss": 2e-5, "grad_norm": 1e-4}
EXACT_KEYS = ("tokens",)  # integer counts of the same batches: must be equal, not close
# Trainer offload: torch's allocator rounds each block up to 512 bytes, so the bytes released and
# re-allocated differ from the storages' own sizes by at most a few KiB per storage; 1% of the
# offloaded bytes is far above that and far below a part left behind (each part is >= 11%).
OFFLOAD_RTOL = 0.01


def relative_diff(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare_step_metrics(reference: Sequence[Mapping[str, float]], candidate: Sequence[Mapping[str, float]],
                         rtol: Mapping[str, float] = PARITY_RTOL, exact: Sequence[str] = EXACT_KEYS) -> dict[str, Any]:
    """Step-by-step comparison of two runs' metrics: `rtol` keys within their relative tolerance,
    `exact` keys equal. Fails on different step lists, missing keys or non-finite values too, so
    a run that stopped early or logged garbage cannot pass by having nothing to compare."""
    problems: list[str] = []
    ref_steps, cand_steps = [int(m["step"]) for m in reference], [int(m["step"]) for m in candidate]
    if not ref_steps or ref_steps != cand_steps:
        problems.append(f"step lists differ: {ref_steps} vs {cand_steps}")
    max_rel = {key: 0.0 for key in rtol}
    for ref, cand in zip(reference, candidate):
        step = int(ref["step"])
        for key in (*rtol, *exact):
            a, b = ref.get(key), cand.get(key)
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                problems.append(f"step {step}: {key} missing or not finite ({a} vs {b})")
            elif key in exact:
                if a != b:
                    problems.append(f"step {step}: {key} {a} != {b}")
            else:
                diff = relative_diff(a, b)
                max_rel[key] = max(max_rel[key], diff)
                if diff > rtol[key]:
                    problems.append(f"step {step}: {key} {a!r} vs {b!r}, relative diff {diff:.3g} > {rtol[key]:g}")
    return {"passed": not problems, "steps": ref_steps, "max_rel_diff": max_rel, "rtol": dict(rtol),
            "problems": problems}


def training_problems(metrics: Sequence[Mapping[str, Any]], steps: int, platform: str, first: int = 1) -> list[str]:
    """Why a run's metrics.jsonl does not show real optimizer steps `first`..`steps` on `platform`
    (`first` > 1: a resumed run).

    Each step must be logged once, with a finite loss over real tokens, a finite non-zero
    gradient norm, not skipped, and with the memory key of the platform it should have run on
    (`gpu_peak_allocated_gib` on CUDA, `cpu_rss_gib` on the CPU: a "GPU" run that silently fell
    back to the CPU fails here)."""
    problems = []
    logged = [m for m in metrics if "loss" in m]
    if [int(m["step"]) for m in logged] != list(range(first, steps + 1)):
        problems.append(f"logged steps {[m.get('step') for m in logged]}, expected {first}..{steps}")
    memory_key = "gpu_peak_allocated_gib" if platform == "cuda" else "cpu_rss_gib"
    for m in logged:
        step = m.get("step")
        if not (math.isfinite(m["loss"]) and m.get("tokens", 0) > 0):
            problems.append(f"step {step}: loss {m['loss']} over {m.get('tokens')} tokens")
        if not (math.isfinite(m.get("grad_norm", math.nan)) and m.get("grad_norm", 0) > 0):
            problems.append(f"step {step}: grad_norm {m.get('grad_norm')}")
        if m.get("skipped", 1.0) != 0.0:
            problems.append(f"step {step}: optimizer step skipped")
        if memory_key not in m:
            problems.append(f"step {step}: no {memory_key} (did it run on the {platform}?)")
    return problems


def step_throughput(metrics: Sequence[Mapping[str, Any]], tokens_per_step: int) -> dict[str, float | None]:
    """Tokens/s of a training step from metrics.jsonl (`train_seconds`, `tokens`): the median over
    steps 2.. (step 1 pays for allocator warm-up and first-call kernel selection), and step 1
    alone. `tokens_per_s` counts every position of the batch (what the GPU computes);
    `loss_tokens_per_s` only the response tokens the loss is taken over."""
    logged = [m for m in metrics if "train_seconds" in m]
    timed = logged[1:] or logged
    if not timed:
        return {"tokens_per_s": None, "loss_tokens_per_s": None, "first_step_seconds": None, "median_step_seconds": None}
    seconds = statistics.median(m["train_seconds"] for m in timed)
    return {"tokens_per_s": tokens_per_step / seconds,
            "loss_tokens_per_s": statistics.median(m["tokens"] / m["train_seconds"] for m in timed),
            "first_step_seconds": logged[0]["train_seconds"], "median_step_seconds": seconds}


def compare_hf_folders(source: Path, exported: Path) -> dict[str, Any]:
    """Bit-for-bit comparison of two HF folders with the `safetensors` library (not the
    project's reader): the same tensor names, and per tensor the same dtype, shape and bytes;
    config.json equal as JSON; tokenizer files byte-identical."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                found.update({name: file for name in handle.keys()})
        return found

    def load(file: Path, name: str) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name)

    a, b = tensors(source), tensors(exported)
    mismatched = []
    for name in sorted(a.keys() & b.keys()):
        x, y = load(a[name], name), load(b[name], name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            mismatched.append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
    other = [f for f in ("tokenizer.model", "tokenizer_config.json") if (source / f).exists()
             and (not (exported / f).exists() or (source / f).read_bytes() != (exported / f).read_bytes())]
    config_equal = json.loads((source / "config.json").read_text()) == json.loads((exported / "config.json").read_text())
    return {"tensors": len(a), "missing": sorted(a.keys() - b.keys()), "extra": sorted(b.keys() - a.keys()),
            "mismatched": mismatched, "config_equal": config_equal, "files_differing": other,
            "exact": bool(a) and a.keys() == b.keys() and not mismatched and config_equal and not other}


def kernel_problems(probe: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict on kernel_probe.py's report: the option table really applied (the model's
    config carries every fusion of the table; recomputation set where asked; on CUDA the fusions
    Megatron-Core runs without TE are on), and every variant trains like the unfused one within the
    GPU-vs-CPU parity tolerance (same function, other kernels)."""
    variants = probe.get("variants") or {}
    problems: list[str] = []
    missing = {"unfused", "platform", "selective", "full"} - set(variants)
    if missing:
        return {"passed": False, "problems": [f"variants missing: {sorted(missing)}"], "comparisons": {}}
    for name, variant in variants.items():
        expected = {k: False for k in variant["config_fields"]} if name == "unfused" else \
            {k: variant["options"][k] for k in variant["config_fields"]}
        if variant["config_fields"] != expected:
            problems.append(f"{name}: the model's config {variant['config_fields']} is not the table {expected}")
    if probe.get("platform") == "cuda" and not variants["platform"]["options"]["bias_activation_fusion"]:
        problems.append("CUDA table without bias_activation_fusion")
    for name, granularity in (("selective", "selective"), ("full", "full"), ("platform", None)):
        if variants[name]["recompute_granularity"] != granularity:
            problems.append(f"{name}: recompute_granularity {variants[name]['recompute_granularity']!r}")
    comparisons = {name: compare_step_metrics(variants["unfused"]["metrics"], variant["metrics"])
                   for name, variant in variants.items() if name != "unfused"}
    problems += [f"{name} vs unfused: {p}" for name, c in comparisons.items() for p in c["problems"]]
    return {"passed": not problems, "problems": problems, "comparisons": comparisons}


def offload_problems(result: Mapping[str, Any]) -> list[str]:
    """What is wrong with an offload probe's result (bench/gpu_check_parts/offload_probe.py):
    storages not emptied, bytes not restored, no training after the reload and, with CUDA, device
    memory not released by (about) the offloaded bytes or not re-allocated after the reload."""
    problems = [f"{key} is false" for key in ("storages_empty_while_offloaded", "checksums_equal",
                                              "grads_zero_after_reload") if not result.get(key)]
    if not math.isfinite(result.get("loss_after_reload", math.nan)):
        problems.append(f"the step after the reload gave loss {result.get('loss_after_reload')}")
    if result.get("cuda"):
        expected, before = result["offloaded_bytes"], result["allocated_before"]
        released, regained = before - result["allocated_offloaded"], result["allocated_reloaded"] - result["allocated_offloaded"]
        for what, value in (("released while offloaded", released), ("re-allocated by the reload", regained)):
            if abs(value - expected) > OFFLOAD_RTOL * expected:
                problems.append(f"{what}: {value / 2**30:.3f} GiB, expected {expected / 2**30:.3f} GiB")
    return problems

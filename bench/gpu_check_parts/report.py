"""The GPU check's JSON report: its schema (the checks, their statuses, the GPU fields),
validate_report (no GPU number without a GPU), the report built from the checks' results, the
summary printed for a person, and writing it all out (with the exit status)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = "rift-gpu-check/1"
CHECKS = ("convert_round_trip", "convert_no_gpu_memory", "gpu_train", "parity_cpu_run",
          "cpu_noise_reference", "loss_parity", "async_checkpoint_resume", "kernel_options", "trainer_offload")
GPU_ONLY = ("convert_no_gpu_memory", "gpu_train", "loss_parity", "async_checkpoint_resume", "kernel_options", "trainer_offload")
STATUSES = ("pass", "fail", "skipped")
GPU_FIELDS = ("device_name", "train_peak_allocated_gib", "train_peak_device_used_gib", "train_process_peak_gib",
              "train_tokens_per_s", "train_loss_tokens_per_s", "train_model_tflops", "convert_max_gpu_mib",
              "parity_max_rel_diff", "offload_released_gib", "offload_expected_gib")


def validate_report(report: Mapping[str, Any]) -> list[str]:
    """Schema problems of a report: every check present with a known status (a reason when
    skipped), `skipped` and `passed` consistent with the checks, and no GPU number without a
    GPU: without CUDA every GPU-only check is skipped and every `gpu` field is null. (When the
    environment probe itself failed, CUDA is unknown, None, and every check has failed.)"""
    problems = []
    for key, kind in (("schema", str), ("passed", bool), ("environment", dict), ("checks", dict),
                      ("skipped", list), ("gpu", dict), ("failures", list)):
        if not isinstance(report.get(key), kind):
            problems.append(f"'{key}' missing or not a {kind.__name__}")
    if problems:
        return problems
    checks = report["checks"]
    for name in CHECKS:
        status = checks.get(name, {}).get("status")
        if status not in STATUSES:
            problems.append(f"checks.{name}.status is {status!r}, not one of {STATUSES}")
        elif status == "skipped" and not checks[name].get("reason"):
            problems.append(f"checks.{name} is skipped without a reason")
    skipped = {s.get("check") for s in report["skipped"]}
    if skipped != {n for n in CHECKS if checks.get(n, {}).get("status") == "skipped"}:
        problems.append(f"'skipped' lists {sorted(map(str, skipped))}, not the skipped checks")
    failed = [n for n in CHECKS if checks.get(n, {}).get("status") == "fail"]
    if report["passed"] != (not failed and not report["failures"]):
        problems.append(f"'passed' is {report['passed']} with failed checks {failed}")
    if set(report["gpu"]) != set(GPU_FIELDS):
        problems.append(f"'gpu' fields {sorted(report['gpu'])} are not {sorted(GPU_FIELDS)}")
    if report["environment"].get("cuda_available") is False:
        problems += [f"gpu.{k} is {v!r} without CUDA (never report an unmeasured GPU number)"
                     for k, v in report["gpu"].items() if v is not None]
        problems += [f"checks.{n} is {checks.get(n, {}).get('status')!r} without CUDA" for n in GPU_ONLY
                     if checks.get(n, {}).get("status") != "skipped"]
    return problems


def gpu_summary(env_info: Mapping[str, Any], checks: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The GPU numbers of the report: each one only when CUDA is present and it was measured."""
    summary: dict[str, Any] = dict.fromkeys(GPU_FIELDS)
    if not env_info.get("cuda_available"):
        return summary
    train, parity, conv = checks.get("gpu_train", {}), checks.get("loss_parity", {}), checks.get("convert_no_gpu_memory", {})
    offload = checks.get("trainer_offload", {}).get("result") or {}
    summary.update(device_name=env_info.get("device_name"), train_peak_allocated_gib=train.get("peak_allocated_gib"),
                   train_peak_device_used_gib=train.get("peak_device_used_gib"),
                   train_process_peak_gib=train.get("process_peak_gib"), train_tokens_per_s=train.get("tokens_per_s"),
                   train_loss_tokens_per_s=train.get("loss_tokens_per_s"),
                   train_model_tflops=train.get("model_tflops_6nd"), convert_max_gpu_mib=conv.get("max_tree_gpu_mib"),
                   parity_max_rel_diff=(parity.get("comparison") or {}).get("max_rel_diff"),
                   offload_released_gib=offload.get("released_gib"), offload_expected_gib=offload.get("expected_gib"))
    return summary


def build_report(env_info: dict[str, Any], ctx_notes: list[str], size: str, checks: dict[str, dict[str, Any]],
                 started: float, inputs: dict[str, Any]) -> dict[str, Any]:
    failures = [f"{name}: {'; '.join(map(str, c.get('problems') or [c.get('reason', 'failed')]))}"
                for name, c in checks.items() if c.get("status") == "fail"]
    report = {"schema": SCHEMA, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_seconds": round(time.time() - started, 1), "size": size, "environment": env_info,
              "notes": ctx_notes, "inputs": inputs, "checks": checks,
              "skipped": [{"check": n, "reason": c["reason"]} for n, c in checks.items() if c.get("status") == "skipped"],
              "gpu": gpu_summary(env_info, checks), "failures": failures, "passed": not failures}
    schema_problems = validate_report(report)
    if schema_problems:
        report["failures"] += [f"report: {p}" for p in schema_problems]
        report["passed"] = False
    return report


def _fmt(value: Any, unit: str, spec: str = ".3g") -> str:
    """A GPU number for the summary, or 'not measured' (never a made-up zero)."""
    return "not measured" if value is None else f"{value:{spec}} {unit}"


def print_summary(report: Mapping[str, Any], out: Path) -> None:
    """A few lines for a person: status per check, the parity margins, the GPU numbers."""
    env, gpu, checks = report["environment"], report["gpu"], report["checks"]
    device = f"yes, {env.get('device_name')}" if env.get("cuda_available") else "no"
    print(f"\n=== gpu_check: {'PASS' if report['passed'] else 'FAIL'} in {report['wall_seconds']} s "
          f"(size {report['size']}, torch {env.get('torch')}, CUDA {device})")
    for name in CHECKS:
        check = checks[name]
        detail = check.get("reason") or "; ".join(map(str, check.get("problems") or []))
        print(f"  {name:<22} {check['status']:<8} {detail[:300]}")
    for label, name in (("CPU micro-batch 2 vs 4", "cpu_noise_reference"), ("GPU vs CPU", "loss_parity")):
        comparison = checks[name].get("comparison")
        if comparison:
            diffs = ", ".join(f"{k} {v:.2g} (tolerance {comparison['rtol'][k]:g})"
                              for k, v in comparison["max_rel_diff"].items())
            print(f"  {label}: max relative difference {diffs}")
    print(f"  GPU training: peak allocated {_fmt(gpu['train_peak_allocated_gib'], 'GiB')}, device used "
          f"{_fmt(gpu['train_peak_device_used_gib'], 'GiB')}, trainer processes (NVML) "
          f"{_fmt(gpu['train_process_peak_gib'], 'GiB')}, throughput {_fmt(gpu['train_tokens_per_s'], 'tokens/s', '.0f')}")
    print(f"  conversions' GPU memory: {_fmt(gpu['convert_max_gpu_mib'], 'MiB')}")
    print(f"  trainer offload: released {_fmt(gpu['offload_released_gib'], 'GiB')} of "
          f"{_fmt(gpu['offload_expected_gib'], 'GiB')} offloaded")
    for item in report["skipped"]:
        print(f"  SKIPPED {item['check']}: {item['reason']}")
    for note in report["notes"]:
        print(f"  note: {note}")
    for failure in report["failures"]:
        print(f"  FAILED {failure[:500]}")
    print(f"  report: {out}")


def write_report(report: dict[str, Any], out: Path, work: Path, keep: bool) -> int:
    """Write the JSON report, print the summary, clean up; the exit status (1: something failed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_summary(report, out)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["passed"] else 1

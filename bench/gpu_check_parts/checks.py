"""The checks of the GPU check, each a function of a Context returning `{check name: result}`:
the conversion round trip (and, with CUDA, that no conversion process touched the GPU), `rift
train` on the GPU, and the GPU-vs-CPU parity runs; plus the time budget every subprocess is cut
to, and `guarded`, which turns a check's exception into failed checks instead of a lost report."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compare import (compare_hf_folders, compare_step_metrics, kernel_problems, offload_problems, step_throughput,
                      training_problems)
from .gpu_watch import GIB, MIB, GpuReader, gpu_usage_problems
from .processes import cpu_env, run_logged, say
from .report import GPU_ONLY
from .shapes import BIG, BIG_RUN, PARITY_RUN, SEED, SMALL, SMALL_RUN, ModelShape, RunShape

# TF32 off in the GPU parity run's environment: NVIDIA's switch for cuBLAS / cuDNN in the whole
# process (the trainer's own code is not edited for this), and torch's own override kept at 0.
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def train_command(overrides: Mapping[str, Any]) -> list[str]:
    def text(value: Any) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [sys.executable, "-m", "rift_megatron.cli", "train", *(f"{k}={text(v)}" for k, v in overrides.items())]


def train_overrides(hf_dir: Path, buffer: Path, run_dir: Path, run: RunShape, dtype: str, lr: float,
                    local_layers: bool, **extra: Any) -> dict[str, Any]:
    """The dotted overrides of one offline run (no config file: every setting is here)."""
    overrides = {"model.hf_dir": hf_dir, "model.dtype": dtype, "data.mode": "offline", "data.buffer": buffer,
                 "training.steps": run.steps, "training.global_batch_size": run.global_batch,
                 "training.micro_batch_size": run.micro_batch, "training.seed": SEED, "optim.lr": lr,
                 "algorithm.name": "rift", "algorithm.r_pos": 1.0, "algorithm.r_neg": -0.2,
                 "parallel.sequence_parallel": False, "logging.dir": run_dir, "checkpoint.resume": "none"}
    if local_layers:
        overrides["model.layer_impl"] = "local"
    return {**overrides, **extra}


def train_run(name: str, overrides: dict[str, Any], env: Mapping[str, str], ctx: Context, platform: str,
              steps: int, timeout: float, reader: GpuReader | None = None, first_step: int = 1) -> dict[str, Any]:
    """One `rift train`; its metrics and whether they show real steps `first_step`..`steps` on `platform`."""
    result = run_logged(train_command(overrides), env, ctx.work / f"{name}.log", ctx.timeout(timeout), reader)
    metrics = read_metrics(Path(overrides["logging.dir"]))
    problems = ([f"exit code {result['returncode']}"] if result["returncode"] else []) + (
        training_problems(metrics, steps, platform, first_step) if result["returncode"] == 0 else [])
    steps_kept = ("step", "loss", "grad_norm", "tokens", "train_seconds", "gpu_peak_allocated_gib", "gpu_used_gib",
                  "cpu_rss_gib")
    return {**result, "problems": problems,
            "metrics": [{k: m[k] for k in steps_kept if k in m} for m in metrics if "loss" in m]}


class BudgetSpent(RuntimeError):
    """The run's time budget (--budget-s) is used up: the remaining checks fail unrun."""


@dataclass
class Context:
    work: Path
    env: dict[str, str]
    cuda: bool
    size: str
    reader: GpuReader | None
    reader_note: str
    local_layers: bool
    deadline: float  # time.monotonic() by which every subprocess must have ended

    def timeout(self, limit: float) -> float:
        """`limit`, cut to what is left of the budget, so a hang costs a check and not the report
        (the device tool kills a command at 10 minutes, and with it any report not yet written)."""
        left = self.deadline - time.monotonic()
        if left < 5:
            raise BudgetSpent(f"time budget spent ({left:.0f} s left): not run")
        return min(limit, left)

    @property
    def model(self) -> ModelShape:
        return BIG if self.size == "full" else SMALL

    @property
    def run(self) -> RunShape:
        return BIG_RUN if self.size == "full" else SMALL_RUN


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def convert_command(direction: str, source_flag: str, source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rift_megatron.cli", "convert", direction, source_flag, str(source), "--out", str(out)]


def check_convert(ctx: Context, hf_dir: Path) -> dict[str, dict[str, Any]]:
    """Round trip HF -> Megatron -> HF through the CLI; with CUDA, each conversion watched."""
    reader = ctx.reader if ctx.cuda else None
    mcore, hf2 = ctx.work / "convert_mcore", ctx.work / "convert_hf"
    steps = {"hf_to_mcore": run_logged(convert_command("hf-to-mcore", "--hf", hf_dir, mcore), ctx.env,
                                       ctx.work / "hf_to_mcore.log", ctx.timeout(300), reader)}
    if steps["hf_to_mcore"]["returncode"] == 0:
        steps["mcore_to_hf"] = run_logged(convert_command("mcore-to-hf", "--ckpt", mcore, hf2), ctx.env,
                                          ctx.work / "mcore_to_hf.log", ctx.timeout(300), reader)
    problems = [f"{name} exited {step['returncode']}" for name, step in steps.items() if step["returncode"]]
    round_trip = compare_hf_folders(hf_dir, hf2) if not problems else None
    if round_trip is not None and not round_trip["exact"]:
        problems.append("round trip not bit-identical")
    convert = {"status": "fail" if problems else "pass", "problems": problems, "model": ctx.model.name,
               "steps": steps, "round_trip": round_trip}
    if not ctx.cuda:
        return {"convert_round_trip": convert, "convert_no_gpu_memory": skipped("no CUDA device: nothing to measure")}
    if reader is None:
        return {"convert_round_trip": convert,
                "convert_no_gpu_memory": {"status": "fail", "problems": [ctx.reader_note]}}
    usage = [f"{name}: {p}" for name, step in steps.items() for p in gpu_usage_problems(step["gpu"])]
    usage += [] if "mcore_to_hf" in steps else ["mcore-to-hf did not run (hf-to-mcore failed): not measured"]
    watched = [step["gpu"] for step in steps.values()]
    return {"convert_round_trip": convert, "convert_no_gpu_memory": {
        "status": "fail" if usage else "pass", "problems": usage, "reader": ctx.reader_note,
        "max_tree_gpu_mib": max((mib or 0.0 for w in watched for mib in w["tree_pids_on_gpu"].values()), default=0.0),
        "max_device_rise_mib": max(w["device_used_rise_mib"] for w in watched), "watched": sorted(steps)}}


def check_gpu_train(ctx: Context, hf_dir: Path, buffer: Path) -> dict[str, dict[str, Any]]:
    """`rift train` offline in bf16 on the GPU, timed and memory-read; the HF folder is converted
    by the trainer itself (model.mcore_ckpt null), as a first-time user's run does."""
    if not ctx.cuda:
        return {"gpu_train": skipped("no CUDA device: torch.cuda.is_available() is False")}
    run, run_dir = ctx.run, ctx.work / "gpu_train"
    overrides = train_overrides(hf_dir, buffer, run_dir, run, "bf16", 1e-5, ctx.local_layers)
    result = train_run("gpu_train", overrides, ctx.env, ctx, "cuda", run.steps, 300, ctx.reader)
    metrics = result["metrics"]
    tokens = run.global_batch * run.seq_len
    speed = step_throughput(metrics, tokens)
    watch = result["gpu"] or {}
    # 6 x parameters x tokens: the usual dense-transformer FLOP estimate (attention excluded).
    tflops = speed["tokens_per_s"] and 6 * ctx.model.num_parameters() * speed["tokens_per_s"] / 1e12
    return {"gpu_train": {
        **result, "status": "fail" if result["problems"] else "pass", "model": ctx.model.name,
        "num_parameters": ctx.model.num_parameters(), "run": run.__dict__, "tokens_per_step": tokens, **speed,
        "model_tflops_6nd": tflops, "peak_allocated_gib": metric_max(metrics, "gpu_peak_allocated_gib"),
        "peak_device_used_gib": metric_max(metrics, "gpu_used_gib"),
        "process_peak_gib": watch["tree_peak_sum_mib"] * MIB / GIB if watch.get("samples") else None}}


def metric_max(metrics: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The largest value of `key` over the steps; None when no step logged it (not measured)."""
    return max((m[key] for m in metrics if key in m), default=None)


PARITY_CHECKS = ("parity_cpu_run", "cpu_noise_reference", "loss_parity", "async_checkpoint_resume")


def check_parity(ctx: Context, hf_dir: Path, buffer: Path) -> dict[str, dict[str, Any]]:
    """The parity model's fp32 steps on the CPU, on the CPU in smaller micro-batches, and on the
    GPU (TF32 off), all from one Megatron checkpoint converted on the CPU, so every run starts
    from the same bits and reads the same samples in the same order. The GPU run writes its
    checkpoints in the background; a second GPU run resumes from its step-2 one."""
    mcore = ctx.work / "parity_mcore"
    conversion = run_logged(convert_command("hf-to-mcore", "--hf", hf_dir, mcore), cpu_env(ctx.env),
                            ctx.work / "parity_convert.log", ctx.timeout(300))
    if conversion["returncode"]:
        return failed_checks(PARITY_CHECKS, "converting the parity model failed", conversion.get("log_tail", ""), ctx.cuda)

    def run(name: str, env: Mapping[str, str], platform: str, first_step: int = 1, **extra: Any) -> dict[str, Any]:
        overrides = train_overrides(hf_dir, buffer, ctx.work / name, PARITY_RUN, "fp32", 1e-3, ctx.local_layers,
                                    **{"model.mcore_ckpt": mcore, "checkpoint.dir": ctx.work / f"{name}_ckpt", **extra})
        return train_run(name, overrides, env, ctx, platform, PARITY_RUN.steps, 300, first_step=first_step)

    cpu = run("parity_cpu", cpu_env(ctx.env), "cpu")
    cpu["status"] = "fail" if cpu["problems"] else "pass"
    small = run("parity_cpu_mb2", cpu_env(ctx.env), "cpu", **{"training.micro_batch_size": 2})
    noise = compare_step_metrics(cpu["metrics"], small["metrics"]) if not (cpu["problems"] or small["problems"]) else None
    reference = {"status": "pass" if noise and noise["passed"] else "fail", "run": small, "comparison": noise,
                 "problems": small["problems"] + (noise["problems"] if noise else ["a CPU run failed"])}
    if not ctx.cuda:
        return {"parity_cpu_run": cpu, "cpu_noise_reference": reference,
                "loss_parity": skipped("no CUDA device: only the CPU side ran (parity_cpu_run)"),
                "async_checkpoint_resume": skipped("no CUDA device (the CPU proxy: tests/distributed/test_resume.py)")}
    # Checkpoints after steps 2 and 4 written in the background while the run goes on (Megatron-Core's
    # async save: D2H staging into pinned memory, a forked writer), then resumed from step 2 below.
    gpu = run("parity_gpu", {**ctx.env, **NO_TF32}, "cuda", **ASYNC_CHECKPOINTS)
    compared = compare_step_metrics(cpu["metrics"], gpu["metrics"]) if not (cpu["problems"] or gpu["problems"]) else None
    parity = {"status": "pass" if compared and compared["passed"] else "fail", "gpu_run": gpu, "gpu_env": NO_TF32,
              "comparison": compared, "problems": gpu["problems"] + (compared["problems"] if compared else ["a run failed"])}
    resume = {"status": "fail", "problems": ["the GPU parity run failed: nothing to resume"]}
    if not gpu["problems"]:
        resumed = run("async_resume_gpu", {**ctx.env, **NO_TF32}, "cuda", first_step=3, **ASYNC_CHECKPOINTS,
                      **{"checkpoint.resume": ctx.work / "parity_gpu_ckpt" / "iter_0000002"})
        resume = async_resume_verdict(gpu, resumed, ctx.work / "parity_gpu_ckpt")
    return {"parity_cpu_run": cpu, "cpu_noise_reference": reference, "loss_parity": parity,
            "async_checkpoint_resume": resume}


# checkpoint.* overrides of the GPU runs whose checkpoints are written in the background.
ASYNC_CHECKPOINTS = {"checkpoint.async_save": True, "checkpoint.interval": 2, "checkpoint.keep_last": None}


def async_resume_verdict(uninterrupted: dict[str, Any], resumed: dict[str, Any], checkpoints: Path) -> dict[str, Any]:
    """The run resumed from the background-written step-2 checkpoint must log the uninterrupted
    run's steps 3.. (same GPU, same bits in: within PARITY_RTOL; a lost Adam state moves them by
    ~1e-2), and every background write must have become a complete checkpoint, the last `latest`."""
    problems = list(resumed["problems"])
    expected = [m for m in uninterrupted["metrics"] if m["step"] > 2]
    compared = compare_step_metrics(expected, resumed["metrics"]) if resumed["returncode"] == 0 else None
    problems += compared["problems"] if compared else []
    saved = sorted(p.name for p in checkpoints.glob("iter_*") if (p / "metadata.json").is_file())
    latest = (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").is_file() else None
    final = f"iter_{PARITY_RUN.steps:07d}"
    if saved != ["iter_0000002", "iter_0000004", final] or latest != final:
        problems.append(f"background checkpoints {saved}, latest {latest}: expected steps 2, 4 and {final}")
    if list(checkpoints.glob(".*partial*")):
        problems.append("a staging directory was left behind")
    return {"status": "fail" if problems else "pass", "problems": problems, "run": resumed, "comparison": compared,
            "checkpoints": saved, "latest": latest}


def check_kernel_options(ctx: Context) -> dict[str, dict[str, Any]]:
    """kernel_probe.py on the GPU (fp32, TF32 off): the CUDA option table applied, and fused,
    unfused and recomputing variants training alike."""
    if not ctx.cuda:
        return {"kernel_options": skipped("no CUDA device: the CPU table is tested in tests/unit/test_performance_options.py")}
    out = ctx.work / "kernel_probe.json"
    cmd = [sys.executable, str(Path(__file__).with_name("kernel_probe.py")), "--out", str(out)]
    result = run_logged(cmd, {**ctx.env, **NO_TF32}, ctx.work / "kernel_probe.log", ctx.timeout(300))
    if result["returncode"] or not out.exists():
        return {"kernel_options": {**result, "status": "fail", "problems": [f"exit code {result['returncode']}"]}}
    probe = json.loads(out.read_text())
    verdict = kernel_problems(probe)
    return {"kernel_options": {**result, "status": "pass" if verdict["passed"] else "fail", **verdict,
                               "device": probe["device"], "table": probe["variants"]["platform"]["options"]}}


def check_trainer_offload(ctx: Context, hf_dir: Path) -> dict[str, dict[str, Any]]:
    """The trainer offload of issue 15 on the GPU: every part released and re-allocated by about
    its bytes (torch.cuda.memory_allocated), every byte restored, a step trains afterwards."""
    if not ctx.cuda:
        return {"trainer_offload": skipped("no CUDA device: the CPU proxy is tests/unit/test_trainer_offload.py")}
    out = ctx.work / "offload_probe.json"
    probe = [sys.executable, str(Path(__file__).with_name("offload_probe.py")), "--hf", str(hf_dir), "--out", str(out)]
    result = run_logged(probe, ctx.env, ctx.work / "offload_probe.log", ctx.timeout(300))
    if result["returncode"] or not out.exists():
        return {"trainer_offload": {**result, "status": "fail", "problems": [f"exit code {result['returncode']}"]}}
    measured = json.loads(out.read_text())
    measured.update(expected_gib=measured["offloaded_bytes"] / GIB,
                    released_gib=(measured["allocated_before"] - measured["allocated_offloaded"]) / GIB)
    problems = offload_problems(measured)
    return {"trainer_offload": {**result, "status": "fail" if problems else "pass", "problems": problems,
                                "result": measured}}


def failed_checks(names: Sequence[str], why: str, error: str, cuda: bool) -> dict[str, dict[str, Any]]:
    """`names` failed with `error` (GPU-only ones are skipped without CUDA: they never ran)."""
    return {name: skipped("no CUDA device") if name in GPU_ONLY and not cuda else
            {"status": "fail", "problems": [why], "error": error} for name in names}


def guarded(names: Sequence[str], fn: Callable[[], dict[str, Any]], cuda: bool) -> dict[str, dict[str, Any]]:
    """Run a check function; an exception fails its checks (with the traceback) but not the rest."""
    try:
        return fn()
    except BudgetSpent as spent:
        say(f"{', '.join(names)}: {spent}")
        return failed_checks(names, str(spent), "", cuda)
    except Exception:
        error = traceback.format_exc()[-4000:]
        say(f"{', '.join(names)} raised:\n{error}")
        return failed_checks(names, "exception", error, cuda)

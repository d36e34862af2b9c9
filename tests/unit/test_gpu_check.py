"""The pieces of `bench/gpu_check.py` that decide pass / fail, each shown to fail on a planted fault.

The whole script needs minutes (and a GPU for half of it); what is tested here is the logic its
verdicts rest on: the GPU-vs-CPU metric comparison, the training-metrics check, tokens/s, the
"conversion used the GPU" verdict, the trainer-offload verdict, the report schema (no GPU number without a GPU), the bit-exact
safetensors comparison, the process-tree walk the NVML sampler uses, and the random buffer.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def _steps(n: int = 5, scale: float = 1.0) -> list[dict]:
    return [{"step": s, "loss": 4.0 / s * scale, "grad_norm": 1.0 + 0.1 * s, "tokens": 1536.0, "skipped": 0.0,
             "train_seconds": 0.5, "cpu_rss_gib": 1.2} for s in range(1, n + 1)]


# ---- compare_step_metrics ---------------------------------------------------------------------


def test_identical_runs_pass_with_zero_difference():
    result = gpu_check.compare_step_metrics(_steps(), _steps())
    assert result["passed"] and result["max_rel_diff"] == {"loss": 0.0, "grad_norm": 0.0}


def test_round_off_sized_differences_pass():
    candidate = _steps()
    for m in candidate:
        m["loss"] *= 1 + 1e-7
        m["grad_norm"] *= 1 - 1e-6
    assert gpu_check.compare_step_metrics(_steps(), candidate)["passed"]


@pytest.mark.parametrize("key, factor", [("loss", 1 + 1e-4), ("grad_norm", 1 + 5e-4)])
def test_a_planted_mismatch_at_one_step_fails_and_names_it(key, factor):
    candidate = _steps()
    candidate[2][key] *= factor
    result = gpu_check.compare_step_metrics(_steps(), candidate)
    assert not result["passed"]
    assert len(result["problems"]) == 1 and result["problems"][0].startswith(f"step 3: {key}")
    assert result["max_rel_diff"][key] == pytest.approx(1 - 1 / factor)


def test_token_counts_must_be_equal_not_close():
    candidate = _steps()
    candidate[0]["tokens"] += 1
    assert "step 1: tokens" in gpu_check.compare_step_metrics(_steps(), candidate)["problems"][0]


@pytest.mark.parametrize("candidate, fragment", [
    (_steps(4), "step lists differ"),
    ([{**m, "loss": math.nan} if m["step"] == 2 else m for m in _steps()], "step 2: loss missing or not finite"),
    ([{k: v for k, v in m.items() if k != "grad_norm"} for m in _steps()], "grad_norm missing"),
])
def test_runs_that_stopped_early_or_logged_garbage_fail(candidate, fragment):
    result = gpu_check.compare_step_metrics(_steps(), candidate)
    assert not result["passed"] and any(fragment in p for p in result["problems"])


def test_two_empty_runs_do_not_pass_by_having_nothing_to_compare():
    assert not gpu_check.compare_step_metrics([], [])["passed"]


def test_the_tolerances_sit_between_measured_round_off_and_measured_faults():
    """The numbers PARITY_RTOL's comment cites: round-off (micro-batch 2 vs 4) must pass, the
    weights-rounded-to-TF32 proxy must fail on the gradient norm, bf16 on both."""
    rtol = gpu_check.PARITY_RTOL
    assert 5.6e-8 < rtol["loss"] < 3.5e-5 and 5.2e-7 < rtol["grad_norm"] < 1.2e-4


# ---- training_problems / step_throughput -------------------------------------------------------


def test_a_clean_cpu_run_has_no_problems():
    assert gpu_check.training_problems(_steps(), 5, "cpu") == []


@pytest.mark.parametrize("edit, platform, fragment", [
    (lambda ms: ms[:4], "cpu", "expected 1..5"),
    (lambda ms: [{**m, "skipped": 1.0} if m["step"] == 3 else m for m in ms], "cpu", "step 3: optimizer step skipped"),
    (lambda ms: [{**m, "grad_norm": 0.0} for m in ms], "cpu", "grad_norm 0.0"),
    (lambda ms: [{**m, "tokens": 0.0} for m in ms], "cpu", "over 0.0 tokens"),
    (lambda ms: ms, "cuda", "no gpu_peak_allocated_gib"),  # a "GPU" run that ran on the CPU
])
def test_training_problems_name_what_is_wrong(edit, platform, fragment):
    problems = gpu_check.training_problems(edit(_steps()), 5, platform)
    assert any(fragment in p for p in problems), problems


def test_throughput_leaves_out_the_first_step():
    metrics = _steps()
    metrics[0]["train_seconds"] = 10.0  # warm-up
    speed = gpu_check.step_throughput(metrics, tokens_per_step=2048)
    assert speed["tokens_per_s"] == pytest.approx(2048 / 0.5)
    assert speed["loss_tokens_per_s"] == pytest.approx(1536 / 0.5) and speed["first_step_seconds"] == 10.0
    assert gpu_check.step_throughput([], 2048)["tokens_per_s"] is None


# ---- gpu_usage_problems ----------------------------------------------------------------------


def _watch(**changes) -> dict:
    return {"samples": 40, "device_used_baseline_mib": 600.0, "device_used_max_mib": 602.0,
            "device_used_rise_mib": 2.0, "tree_pids_on_gpu": {}, "tree_peak_sum_mib": 0.0, "new_pids_on_gpu": {},
            **changes}


def test_a_conversion_that_never_touched_the_gpu_passes():
    assert gpu_check.gpu_usage_problems(_watch()) == []


@pytest.mark.parametrize("changes, fragment", [
    ({"tree_pids_on_gpu": {4242: 0.0}}, "pid 4242 held 0 MiB"),  # a context with nothing allocated counts
    ({"tree_pids_on_gpu": {4242: None}}, "unknown amount"),
    ({"new_pids_on_gpu": {77: 500.0}}, "new process (pid 77"),  # pid not visible to us (namespaces)
    ({"device_used_rise_mib": 500.0}, "rose by 500 MiB"),
    ({"samples": 0}, "no GPU memory sample"),
    ({"error_count": 3, "errors": ["NVMLError: Unknown Error"]}, "3 GPU memory readings failed"),
])
def test_any_sign_of_gpu_use_fails(changes, fragment):
    assert any(fragment in p for p in gpu_check.gpu_usage_problems(_watch(**changes)))


def test_a_spent_time_budget_fails_the_checks_not_yet_run_and_skips_gpu_ones_without_cuda(tmp_path):
    ctx = gpu_check.Context(tmp_path, {}, False, "quick", None, "no CUDA device", True, deadline=0.0)
    with pytest.raises(gpu_check.BudgetSpent):
        ctx.timeout(60)
    result = gpu_check.guarded(("parity_cpu_run", "loss_parity"), lambda: {"parity_cpu_run": {"x": ctx.timeout(60)}},
                               cuda=False)
    assert result["parity_cpu_run"]["status"] == "fail" and "time budget spent" in result["parity_cpu_run"]["problems"][0]
    assert result["loss_parity"]["status"] == "skipped"


# ---- report schema -----------------------------------------------------------------------------


def _cpu_report() -> dict:
    checks = {name: {"status": "pass", "problems": []} for name in gpu_check.CHECKS}
    for name in gpu_check.GPU_ONLY:
        checks[name] = gpu_check.skipped("no CUDA device")
    env = {"cuda_available": False, "torch": "2.13.0+cpu"}
    return gpu_check.build_report(env, [], "quick", checks, started=0.0, inputs={})


def test_a_cpu_report_passes_its_schema_with_every_gpu_field_null():
    report = _cpu_report()
    assert gpu_check.validate_report(report) == [] and report["passed"]
    assert set(report["gpu"]) == set(gpu_check.GPU_FIELDS) and all(v is None for v in report["gpu"].values())
    assert {s["check"] for s in report["skipped"]} == set(gpu_check.GPU_ONLY)
    json.dumps(report)  # what main() writes


def test_a_gpu_number_in_a_cpu_report_is_a_schema_error():
    report = _cpu_report()
    report["gpu"]["train_tokens_per_s"] = 12345.0
    assert any("gpu.train_tokens_per_s" in p for p in gpu_check.validate_report(report))


def test_a_gpu_only_check_that_passed_without_cuda_is_a_schema_error():
    report = _cpu_report()
    report["checks"]["gpu_train"] = {"status": "pass"}
    report["skipped"] = [s for s in report["skipped"] if s["check"] != "gpu_train"]
    assert any("checks.gpu_train is 'pass' without CUDA" in p for p in gpu_check.validate_report(report))


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r["checks"].pop("parity_cpu_run"), "checks.parity_cpu_run.status is None"),
    (lambda r: r["checks"]["gpu_train"].pop("reason"), "skipped without a reason"),
    (lambda r: r["skipped"].pop(), "'skipped' lists"),
    (lambda r: r["checks"]["convert_round_trip"].update(status="fail"), "'passed' is True"),
    (lambda r: r.pop("gpu"), "'gpu' missing"),
])
def test_schema_errors_are_found(edit, fragment):
    report = _cpu_report()
    edit(report)
    assert any(fragment in p for p in gpu_check.validate_report(report))


def test_build_report_fails_a_run_with_a_failed_check_and_says_why():
    checks = json.loads(json.dumps(_cpu_report()["checks"]))
    checks["convert_round_trip"] = {"status": "fail", "problems": ["round trip not bit-identical"]}
    report = gpu_check.build_report({"cuda_available": False}, [], "quick", checks, started=0.0, inputs={})
    assert not report["passed"] and report["failures"] == ["convert_round_trip: round trip not bit-identical"]
    assert gpu_check.validate_report(report) == []


# ---- compare_hf_folders ----------------------------------------------------------------------


def _hf_folder(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    (path / "tokenizer.model").write_bytes(b"spm")
    return path


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(8, 4, generator=generator).to(torch.bfloat16),
            "b.weight": torch.randn(16, generator=generator)}


def test_identical_folders_are_exact(tmp_path):
    result = gpu_check.compare_hf_folders(_hf_folder(tmp_path / "x", _tensors()), _hf_folder(tmp_path / "y", _tensors()))
    assert result["exact"] and result["tensors"] == 2


def test_one_flipped_bit_is_found(tmp_path):
    changed = _tensors()
    changed["a.weight"].view(torch.int16)[3, 2] ^= 1  # lowest mantissa bit of one bf16 value
    result = gpu_check.compare_hf_folders(_hf_folder(tmp_path / "x", _tensors()), _hf_folder(tmp_path / "y", changed))
    assert not result["exact"] and [m.split(":")[0] for m in result["mismatched"]] == ["a.weight"]


@pytest.mark.parametrize("edit, key", [
    (lambda t, c: t.pop("b.weight"), "missing"),
    (lambda t, c: t.update({"b.weight": t["b.weight"].double()}), "mismatched"),  # same values, another dtype
    (lambda t, c: c.update(torch_dtype="float32"), "config_equal"),
])
def test_missing_tensors_dtype_changes_and_config_edits_are_not_exact(tmp_path, edit, key):
    tensors, config = _tensors(), {"architectures": ["LlamaForCausalLM"]}
    edit(tensors, config)
    result = gpu_check.compare_hf_folders(_hf_folder(tmp_path / "x", _tensors()),
                                          _hf_folder(tmp_path / "y", tensors, config))
    assert not result["exact"]
    assert result[key] is False if key == "config_equal" else result[key]


# ---- process_tree, build_buffer, train_command -------------------------------------------------


def test_process_tree_finds_a_grandchild():
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        assert {parent.pid, grandchild} <= gpu_check.process_tree(parent.pid)
        assert grandchild not in gpu_check.process_tree(grandchild + 10**7)
    finally:
        subprocess.run(["kill", str(grandchild)], check=False)
        parent.wait(timeout=10)


def test_the_random_buffer_has_the_shape_the_run_expects(tmp_path):
    from rift_megatron.rollout.buffer import load_buffer

    run = gpu_check.RunShape(steps=2, global_batch=4, micro_batch=2, prompt_len=5, response_len=7)
    shape = gpu_check.PARITY
    gpu_check.build_buffer(tmp_path, shape, run, seed=3)
    rows = load_buffer(tmp_path)
    assert len(rows) == 8 and [r.reward for r in rows[:2]] == [1.0, -0.2]
    for row in rows:
        assert len(row.prompt_ids) == 5 and len(row.response_ids) == len(row.behavior_logprobs) == 7
        assert all(4 <= t < shape.vocab for t in row.prompt_ids + row.response_ids)
        assert all(abs(lp + math.log(shape.vocab)) < 0.5 and lp < 0 for lp in row.behavior_logprobs)
    gpu_check.build_buffer(tmp_path / "again", shape, run, seed=3)
    assert load_buffer(tmp_path / "again") == rows  # seeded: the GPU and CPU runs read the same data


def test_train_command_spells_values_as_the_config_loader_reads_them():
    command = gpu_check.train_command({"model.mcore_ckpt": None, "parallel.sequence_parallel": False, "optim.lr": 1e-3})
    assert command[-3:] == ["model.mcore_ckpt=null", "parallel.sequence_parallel=false", "optim.lr=0.001"]
    from rift_megatron.config import load_config

    cfg = load_config(None, command[-3:])
    assert cfg.model.mcore_ckpt is None and cfg.parallel.sequence_parallel is False and cfg.optim.lr == 1e-3


# ---- kernel_options: the probe and its verdict ----------------------------------------------------


@pytest.fixture(scope="module")
def cpu_probe(tmp_path_factory) -> dict:
    """kernel_probe.py as the check runs it, on the CPU (tiny model): the CPU table, all variants."""
    from tests.environment import subprocess_env

    out = tmp_path_factory.mktemp("probe") / "probe.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check_parts" / "kernel_probe.py"), "--out", str(out),
                           "--model", "tiny"], env=subprocess_env(CUDA_VISIBLE_DEVICES=""), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_kernel_probe_runs_every_variant_and_passes_on_the_cpu(cpu_probe):
    verdict = gpu_check.kernel_problems(cpu_probe)
    assert verdict["passed"], verdict["problems"]
    assert cpu_probe["platform"] == "cpu" and set(verdict["comparisons"]) == {"platform", "selective", "full"}
    assert not any(cpu_probe["variants"]["platform"]["config_fields"].values())  # the CPU table: no fusion


@pytest.mark.parametrize("plant, fragment", [
    (lambda p: p["variants"]["full"]["metrics"][1].update(loss=p["variants"]["full"]["metrics"][1]["loss"] * 1.001),
     "full vs unfused: step 2: loss"),
    (lambda p: p["variants"]["platform"]["config_fields"].update(bias_activation_fusion=True),
     "platform: the model's config"),
    (lambda p: p["variants"]["selective"].update(recompute_granularity=None), "selective: recompute_granularity None"),
    (lambda p: p.update(platform="cuda"), "CUDA table without bias_activation_fusion"),
    (lambda p: p["variants"].pop("unfused"), "variants missing: ['unfused']"),
])
def test_the_kernel_verdict_fails_on_a_planted_fault(cpu_probe, plant, fragment):
    probe = json.loads(json.dumps(cpu_probe))
    plant(probe)
    verdict = gpu_check.kernel_problems(probe)
    assert not verdict["passed"] and any(fragment in p for p in verdict["problems"]), verdict["problems"]


# ---- offload_problems ------------------------------------------------------------------------

GIB = 2**30


def _offload_result(**changes) -> dict:
    """An offload probe's result as a GPU run gives it: 16 GiB offloaded, released and re-allocated
    up to allocator rounding (a few KiB)."""
    result = {"cuda": True, "offloaded_bytes": 16 * GIB, "allocated_before": 20 * GIB,
              "allocated_offloaded": 4 * GIB + 4096, "allocated_reloaded": 20 * GIB + 1024,
              "storages_empty_while_offloaded": True, "checksums_equal": True, "grads_zero_after_reload": True,
              "loss_after_reload": 3.06}
    return {**result, **changes}


def test_an_offload_that_released_and_restored_everything_passes():
    assert gpu_check.offload_problems(_offload_result()) == []
    cpu = _offload_result(cuda=False, allocated_before=None, allocated_offloaded=None, allocated_reloaded=None)
    assert gpu_check.offload_problems(cpu) == []


@pytest.mark.parametrize("changes, fragment", [
    ({"allocated_offloaded": 14 * GIB}, "released while offloaded: 6.000 GiB, expected 16.000 GiB"),  # the optimizer part stayed
    ({"allocated_reloaded": 12 * GIB}, "re-allocated by the reload"),  # a part not brought back
    ({"checksums_equal": False}, "checksums_equal is false"),
    ({"storages_empty_while_offloaded": False}, "storages_empty_while_offloaded is false"),
    ({"grads_zero_after_reload": False}, "grads_zero_after_reload is false"),
    ({"loss_after_reload": math.nan}, "the step after the reload gave loss nan"),
])
def test_an_offload_that_kept_or_lost_something_fails_and_says_what(changes, fragment):
    problems = gpu_check.offload_problems(_offload_result(**changes))
    assert any(fragment in p for p in problems), problems

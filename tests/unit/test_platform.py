"""The CPU compatibility layer: every patch is needed, none is applied on the CUDA path.

Each patch in `cpu_compat.PATCH_NAMES` is paired with real Megatron-Core calls from the training
path (`tests/unit/platform_scenarios.py`). The calls must succeed with every patch applied and
fail, inside Megatron-Core at the CUDA assumption the patch exists for, when only that patch is
left out. Patching is process-global, so every run is a fresh process (one per rank for the
pipeline-parallel scenarios); the runs are started together and share the two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rift_megatron.platform import cpu_compat
from rift_megatron.platform.device import Platform, detect_platform

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("platform_scenarios.py")
RESULT_MARKER = "SCENARIO_RESULT "  # platform_scenarios.RESULT_MARKER (not imported: no megatron here)
RUN_TIMEOUT = 420.0  # seconds per run (from its start; generous for a loaded machine)
PARALLEL_RUNS = 2

NO_CUDA = "Torch not compiled with CUDA enabled"

# patch -> {(scenario, case): (Megatron-Core file, fragment of the failing line, error fragment)}
# Every case listed for a patch must pass with all patches and fail like this without that one.
NEEDED_BY: dict[str, dict[tuple[str, str], tuple[str, str, str]]] = {
    "current_device": {
        ("ddp", "ddp_grad_sync"): (
            "distributed/param_and_grad_buffer.py", "torch.cuda.current_device()", NO_CUDA),
    },
    "cuda_rng": {
        ("rng_tracker", "seeded_fork"): (
            "tensor_parallel/random.py", "torch.cuda.get_rng_state()", NO_CUDA),
    },
    "device_literals": {
        ("schedule", "forward_backward_no_pipelining"): (
            "pipeline_parallel/schedules.py", 'device="cuda"', NO_CUDA),
        ("schedule", "gpt_forward_default_causal_mask"): (
            "transformer/utils.py", 'device="cuda"', NO_CUDA),
        ("exchange_buffers", "unloaded_shard_buffer"): (
            "dist_checkpointing/mapping.py", "self.data = init_fn(", NO_CUDA),
        ("exchange_buffers", "loaded_shard_buffer"): (
            "dist_checkpointing/exchange_utils.py", 'device="cuda"', NO_CUDA),
    },
    "tensor_cuda": {
        ("tied_embeddings", "tied_embedding_init"): (
            "models/common/language_module/language_module.py", "weight.data.cuda()", NO_CUDA),
    },
    "tensor_type_names": {
        ("optimizer", "distributed_optimizer_step"): (
            "optimizer/distrib_optimizer.py", "raise TypeError",
            "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor"),
        ("optimizer", "clipped_fp32_optimizer_step"): (
            "optimizer/clip_grads.py", "assert param.grad.type() == 'torch.cuda.FloatTensor'",
            "AssertionError"),
    },
    "synchronize": {
        ("checkpoint", "save_and_load"): (
            "dist_checkpointing/strategies/filesystem_async.py", "torch.cuda.synchronize()", NO_CUDA),
        ("pipeline_p2p", "pipeline_step"): (
            "pipeline_parallel/p2p_communication.py", "torch.cuda.synchronize()", NO_CUDA),
    },
}
# Ranks each scenario needs (platform_scenarios.WORLD_SIZE).
WORLD_SIZE = {"tied_embeddings": 2, "pipeline_p2p": 2, "fully_parallel_load": 2}

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU compatibility layer only runs on CUDA-less machines"
)


# --------------------------------------------------------------------------- subprocess runs


def _base_env() -> dict[str, str]:
    from tests.environment import subprocess_env

    return subprocess_env()


def _communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Wait for every process; on timeout kill them (and their children) and fail."""
    outputs: list[tuple[str, str] | None] = [None] * len(procs)

    def drain(index: int) -> None:
        outputs[index] = procs[index].communicate()

    threads = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if any(thread.is_alive() for thread in threads):
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the worker and its helpers
        for thread in threads:
            thread.join(30)
        tails = "\n".join(f"--- rank {i} stderr ---\n{(out or ('', ''))[1][-4000:]}"
                          for i, out in enumerate(outputs))
        raise AssertionError(f"run timed out after {timeout:.0f}s:\n{tails}")
    return outputs  # type: ignore[return-value]


def run_scenarios(scenarios: tuple[str, ...], skip: str | None) -> list[dict]:
    """Run the scenarios in fresh worker processes; returns each rank's report."""
    world_size = max(WORLD_SIZE.get(name, 1) for name in scenarios)
    command = [sys.executable, str(WORKER), *scenarios] + (["--skip", skip] if skip else [])
    env = _base_env()
    rank_envs = [dict(env)]
    if world_size > 1:
        rendezvous = f"file://{tempfile.mkdtemp(prefix='rift-platform-')}/store"  # no port to race for
        rank_envs = [
            dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size), RIFT_TEST_RENDEZVOUS=rendezvous)
            for r in range(world_size)
        ]
    procs = [
        subprocess.Popen(command, env=rank_env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank_env in rank_envs
    ]
    reports = []
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, _communicate_all(procs, RUN_TIMEOUT))):
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
        if not lines:
            raise AssertionError(
                f"{' '.join(command[1:])} (rank {rank}) printed no result, exit {proc.returncode}:\n"
                f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-8000:]}"
            )
        report = json.loads(lines[-1][len(RESULT_MARKER):])
        report["returncode"] = proc.returncode
        reports.append(report)
    return reports


# The CUDA path in a fresh process: fake a visible GPU (only `torch.cuda.is_available`), pick the
# platform, and check that nothing was patched; then, as a control that the probe can see patching,
# do the same on this CPU machine.
CUDA_PATH_PROBE = textwrap.dedent(
    """
    import importlib, json, torch
    from rift_megatron.platform import cpu_compat, current_platform

    GLOBALS = {
        "torch.cuda.current_device": lambda: torch.cuda.current_device,
        "torch.cuda.synchronize": lambda: torch.cuda.synchronize,
        "torch.Tensor.cuda": lambda: torch.Tensor.cuda,
        "torch.Tensor.type": lambda: torch.Tensor.type,
        "torch.zeros": lambda: torch.zeros,
    }
    originals = {name: get() for name, get in GLOBALS.items()}
    calls = []
    real_apply = cpu_compat.apply_cpu_compat
    def recording_apply(*args, **kwargs):
        calls.append(kwargs.get("skip", args[0] if args else ()))
        return real_apply(*args, **kwargs)
    cpu_compat.apply_cpu_compat = recording_apply

    def snapshot():
        modules = [*cpu_compat._DEVICE_LITERAL_MODULES, "megatron.core.tensor_parallel.random"]
        rng = importlib.import_module("megatron.core.tensor_parallel.random")
        return {
            "apply_calls": len(calls),
            "applied": list(cpu_compat.applied_patches()),
            "globals_unchanged": {name: get() is originals[name] for name, get in GLOBALS.items()},
            "megatron_sees_real_torch": {m: importlib.import_module(m).torch is torch for m in modules},
            "rng_functions_are_megatron_s": [
                rng._get_cuda_rng_state.__module__, rng._set_cuda_rng_state.__module__],
        }

    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    current_platform.cache_clear()
    try:
        cuda = current_platform()
        cuda_again = current_platform()
    finally:
        torch.cuda.is_available = real_is_available
    result = {"cuda_platform": [cuda.kind, cuda.backend],
              "cached": cuda_again is cuda, "on_cuda": snapshot()}
    current_platform.cache_clear()
    cpu = current_platform()
    result["cpu_platform"] = [cpu.kind, cpu.backend]
    result["on_cpu"] = snapshot()
    current_platform.cache_clear()
    print("PROBE " + json.dumps(result))
    """
)


def run_cuda_path_probe() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CUDA_PATH_PROBE], env=_base_env(), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    ((stdout, stderr),) = _communicate_all([proc], RUN_TIMEOUT)
    lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, f"probe failed ({proc.returncode}):\n{stderr[-8000:]}"
    return json.loads(lines[-1][len("PROBE "):])


ALL_PATCHES_1_RANK = ("ddp", "rng_tracker", "schedule", "optimizer", "checkpoint", "exchange_buffers", "scoping")
ALL_PATCHES_2_RANKS = ("tied_embeddings", "pipeline_p2p", "fully_parallel_load")


def _skip_runs(patch: str) -> list[tuple[tuple[str, ...], str]]:
    """The runs that show `patch` is needed: its scenarios grouped by world size."""
    by_size: dict[int, list[str]] = {}
    for scenario, _ in NEEDED_BY[patch]:
        group = by_size.setdefault(WORLD_SIZE.get(scenario, 1), [])
        if scenario not in group:
            group.append(scenario)
    return [(tuple(group), patch) for _, group in sorted(by_size.items())]


class Runs:
    """Subprocess runs started up front (two at a time) for the tests selected in this session."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=PARALLEL_RUNS)
        self._futures: dict[object, Future] = {}

    def start(self, key, fn, *args) -> None:
        if key not in self._futures:
            self._futures[key] = self._pool.submit(fn, *args)

    def start_scenarios(self, scenarios: tuple[str, ...], skip: str | None) -> None:
        self.start((scenarios, skip), run_scenarios, scenarios, skip)

    def scenarios(self, scenarios: tuple[str, ...], skip: str | None) -> list[dict]:
        self.start_scenarios(scenarios, skip)
        return self._futures[(scenarios, skip)].result()

    def cuda_path_probe(self) -> dict:
        self.start("cuda_path_probe", run_cuda_path_probe)
        return self._futures["cuda_path_probe"].result()

    def all_patches(self) -> list[dict]:
        """Every rank's report of the runs with all patches (current_platform())."""
        return self.scenarios(ALL_PATCHES_1_RANK, None) + self.scenarios(ALL_PATCHES_2_RANKS, None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(request):
    runs = Runs()
    selected = [item for item in request.session.items
                if getattr(item, "module", None) is request.module and "runs" in item.fixturenames]
    # Slowest first: the two-rank runs, then the rest.
    needs_all = any(item.originalname != "test_cuda_path_applies_nothing" for item in selected)
    if needs_all:
        runs.start_scenarios(ALL_PATCHES_2_RANKS, None)
    patches = [item.callspec.params["patch"] for item in selected
               if item.originalname == "test_patch_is_needed"]
    for patch in sorted(patches, key=lambda p: -len(_skip_runs(p))):
        for scenarios, skip in _skip_runs(patch):
            runs.start_scenarios(scenarios, skip)
    if needs_all:
        runs.start_scenarios(ALL_PATCHES_1_RANK, None)
    if any(item.originalname == "test_cuda_path_applies_nothing" for item in selected):
        runs.start("cuda_path_probe", run_cuda_path_probe)
    yield runs
    runs.close()


def _cases(reports: list[dict], scenario: str, case: str) -> list[dict]:
    found = [report["scenarios"][scenario][case] for report in reports if scenario in report["scenarios"]]
    assert found, f"no rank ran {scenario}/{case}"
    return found


def _explain(result: dict) -> str:
    return result.get("traceback") or json.dumps(result)


# --------------------------------------------------------------------------- every patch is needed


def test_every_patch_has_a_scenario():
    assert set(NEEDED_BY) == set(cpu_compat.PATCH_NAMES)
    assert len(cpu_compat.PATCH_NAMES) == len(set(cpu_compat.PATCH_NAMES)) == 6


@cpu_only
@pytest.mark.parametrize("patch", cpu_compat.PATCH_NAMES)
def test_patch_is_needed(patch, runs):
    expected_cases = NEEDED_BY[patch]

    # (a) With every patch (applied by current_platform()) the Megatron-Core calls succeed.
    passing = runs.all_patches()
    for scenario, case in expected_cases:
        for result in _cases(passing, scenario, case):
            assert result["ok"], f"{scenario}/{case} fails with all patches:\n{_explain(result)}"

    # (b) Without this one patch each of them fails inside Megatron-Core, at the CUDA assumption.
    for scenarios, skip in _skip_runs(patch):
        reports = runs.scenarios(scenarios, skip)
        for report in reports:
            assert report["applied"] == [p for p in cpu_compat.PATCH_NAMES if p != patch], (
                "the skip run must apply exactly the other patches"
            )
            assert report["platform"] is None, "current_platform() must not run in a skip run"
            assert report["returncode"] == 1
            ran = {(scenario, case) for scenario in scenarios for case in report["scenarios"][scenario]}
            assert ran == {key for key in expected_cases if key[0] in scenarios}, (
                "every case of a scenario must be listed in NEEDED_BY"
            )
        for (scenario, case), (megatron_file, code, error) in expected_cases.items():
            if scenario not in scenarios:
                continue
            for result in _cases(reports, scenario, case):
                assert not result["ok"], f"{scenario}/{case} passes without the {patch!r} patch"
                assert error in result["error"], _explain(result)
                frame = result["megatron_frame"]
                assert frame is not None, (
                    f"{scenario}/{case} did not fail in Megatron-Core:\n{_explain(result)}"
                )
                assert frame["file"] == megatron_file and code in frame["code"], (
                    f"{scenario}/{case} failed elsewhere than expected: {frame}\n{_explain(result)}"
                )


@cpu_only
def test_cpu_platform_applies_every_patch(runs):
    assert detect_platform() == Platform(kind="cpu", backend="gloo")
    for report in runs.all_patches():
        assert report["platform"] == {"kind": "cpu", "backend": "gloo", "layer_impl": "local"}
        assert report["applied"] == list(cpu_compat.PATCH_NAMES)
        assert report["returncode"] == 0, json.dumps(report["scenarios"], indent=1)[-6000:]


# --------------------------------------------------------------------------- scoping


@cpu_only
def test_scoped_patches_do_not_leak_out_of_megatron(runs):
    (report,) = runs.scenarios(ALL_PATCHES_1_RANK, None)
    result = report["scenarios"]["scoping"]["observations"]
    assert result["ok"], _explain(result)
    seen = result["value"]
    # Tensor.type is patched process-wide ...
    assert seen["tensor_type_is_original"] is False
    # ... but code outside Megatron-Core still gets the true (CPU) names and conversions.
    assert seen["type_from_test_code"] == "torch.FloatTensor"
    assert seen["half_type_from_test_code"] == "torch.HalfTensor"
    assert seen["type_conversion_dtype"] == "torch.float64"
    assert seen["type_conversion_name"] == "torch.DoubleTensor"
    # device="cuda" factories are redirected only for the listed Megatron modules.
    assert seen["global_torch_zeros_is_original"] is True
    assert NO_CUDA in seen["cuda_factory_from_test_code"]
    assert seen["megatron_default_causal_mask_device"] == "cpu"
    listed = set(cpu_compat._DEVICE_LITERAL_MODULES) | {"megatron.core.tensor_parallel.random"}
    assert seen["torch_seen_by"] == {
        module: ("view" if module in listed else "real torch") for module in seen["torch_seen_by"]
    }
    assert set(seen["torch_seen_by"]) > listed  # modules outside the list were checked too


# --------------------------------------------------------------------------- the CUDA path


@pytest.fixture
def recorded_patches(monkeypatch) -> list[str]:
    """Swap the patches for recorders, so a regression cannot patch the pytest process itself."""
    calls: list[str] = []
    monkeypatch.setattr(cpu_compat, "PATCHES", tuple(
        cpu_compat.Patch(patch.name, patch.why, lambda name=patch.name: calls.append(name))
        for patch in cpu_compat.PATCHES
    ))
    monkeypatch.setattr(cpu_compat, "_applied", [])
    return calls


@cpu_only
def test_recorded_patches_fixture_records(recorded_patches):
    # Control for the tests below: with CUDA absent the recorders do get called.
    assert cpu_compat.apply_cpu_compat(skip={"synchronize"}) == cpu_compat.PATCH_NAMES[:-1]
    assert recorded_patches == list(cpu_compat.PATCH_NAMES[:-1])


def test_apply_cpu_compat_refuses_when_cuda_is_available(monkeypatch, recorded_patches):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be applied when CUDA is available"):
        cpu_compat.apply_cpu_compat()
    with pytest.raises(RuntimeError, match="must not be applied when CUDA is available"):
        cpu_compat.apply_cpu_compat(skip={"synchronize"})
    assert recorded_patches == []
    assert cpu_compat.applied_patches() == ()


def test_detect_platform_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    platform = detect_platform()
    assert platform == Platform(kind="cuda", backend="nccl")
    assert platform.is_cuda


@cpu_only
def test_cuda_path_applies_nothing(runs):
    probe = runs.cuda_path_probe()
    assert probe["cuda_platform"] == ["cuda", "nccl"]
    assert probe["cached"] is True
    on_cuda = probe["on_cuda"]
    assert on_cuda["apply_calls"] == 0
    assert on_cuda["applied"] == []
    assert all(on_cuda["globals_unchanged"].values()), on_cuda["globals_unchanged"]
    assert all(on_cuda["megatron_sees_real_torch"].values()), on_cuda["megatron_sees_real_torch"]
    assert on_cuda["rng_functions_are_megatron_s"] == ["megatron.core.tensor_parallel.random"] * 2
    # Control: the same probe does see the layer applied on this CPU machine.
    assert probe["cpu_platform"] == ["cpu", "gloo"]
    on_cpu = probe["on_cpu"]
    assert on_cpu["apply_calls"] == 1
    assert on_cpu["applied"] == list(cpu_compat.PATCH_NAMES)
    assert not any(on_cpu["globals_unchanged"][name] for name in (
        "torch.cuda.current_device", "torch.cuda.synchronize", "torch.Tensor.cuda", "torch.Tensor.type"))
    assert on_cpu["globals_unchanged"]["torch.zeros"] is True
    assert not any(on_cpu["megatron_sees_real_torch"].values())
    assert on_cpu["rng_functions_are_megatron_s"] == ["rift_megatron.platform.cpu_compat"] * 2


# --------------------------------------------------------------------------- arguments


@cpu_only
def test_unknown_patch_name_is_refused(recorded_patches):
    with pytest.raises(ValueError, match="bogus"):
        cpu_compat.apply_cpu_compat(skip={"bogus"})
    with pytest.raises(ValueError, match="bogus"):
        cpu_compat.apply_cpu_compat(skip={"synchronize", "bogus"})
    assert recorded_patches == []
    assert cpu_compat.applied_patches() == ()


# ---- model.layer_impl: one decision, made by the platform layer ---------------------------------


def test_layer_impl_auto_is_local_on_the_cpu():
    from rift_megatron.platform import resolve_layer_impl

    assert resolve_layer_impl("auto", Platform(kind="cpu", backend="gloo")) == "local"
    assert resolve_layer_impl("local", Platform(kind="cpu", backend="gloo")) == "local"


def test_layer_impl_auto_on_cuda_without_transformer_engine_is_local_with_a_notice(monkeypatch, caplog):
    """A stock CUDA PyTorch without TE must run (on the local layers), saying so once."""
    from rift_megatron.platform import device, resolve_layer_impl

    monkeypatch.setattr(device, "transformer_engine_available", lambda: False)
    device._notice_local_layers_on_cuda.cache_clear()
    cuda = Platform(kind="cuda", backend="nccl")
    with caplog.at_level("WARNING", logger=device.__name__):
        assert resolve_layer_impl("auto", cuda) == "local"
        assert resolve_layer_impl("auto", cuda) == "local"
    notices = [r.getMessage() for r in caplog.records if "Transformer Engine is not installed" in r.getMessage()]
    assert len(notices) == 1, notices
    assert "\n" not in notices[0]


def test_layer_impl_auto_on_cuda_with_transformer_engine_is_transformer_engine(monkeypatch):
    from rift_megatron.platform import device, resolve_layer_impl

    monkeypatch.setattr(device, "transformer_engine_available", lambda: True)
    assert resolve_layer_impl("auto", Platform(kind="cuda", backend="nccl")) == "transformer_engine"
    assert resolve_layer_impl("local", Platform(kind="cuda", backend="nccl")) == "local"


@pytest.mark.parametrize("kind,has_te,match", [
    ("cpu", True, "needs a CUDA GPU"),
    ("cuda", False, "Transformer Engine is not installed"),
])
def test_layer_impl_transformer_engine_refused_in_one_line_where_it_cannot_run(monkeypatch, kind, has_te, match):
    from rift_megatron.platform import LayerImplError, device, resolve_layer_impl

    monkeypatch.setattr(device, "transformer_engine_available", lambda: has_te)
    with pytest.raises(LayerImplError, match=match) as error:
        resolve_layer_impl("transformer_engine", Platform(kind=kind, backend="nccl" if kind == "cuda" else "gloo"))
    assert "\n" not in str(error.value)


def test_layer_impl_rejects_unknown_values():
    from rift_megatron.platform import LayerImplError, resolve_layer_impl

    with pytest.raises(LayerImplError, match="must be one of"):
        resolve_layer_impl("te", Platform(kind="cpu", backend="gloo"))


def test_to_device_moves_every_tensor_of_a_batch():
    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "rewards": torch.ones(2)}
    moved = Platform(kind="cpu", backend="gloo").to_device(batch)
    assert set(moved) == set(batch)
    assert all(t.device == torch.device("cpu") for t in moved.values())
    assert torch.equal(moved["rewards"], batch["rewards"])

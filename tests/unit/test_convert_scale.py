"""Conversion tools at 70B scale (issue 12, item 9): `mcore-to-hf --nproc N` and the memory
that `verify --layers N` needs, on small models.

* `mcore-to-hf --nproc 2` must write byte for byte what one process writes (same file names,
  same bytes, same index), with each process given whole shard files; a failure in one process
  is one line (exit 2) and leaves no output.
* `verify --layers N` builds both sides with only N layers. What a 70B run can afford depends on
  neither side touching the other layers, so that is measured here on a model whose layers
  dominate its size (8 layers of 3.9M parameters; embedding and head 0.5M each): the reference
  model's peak memory (transformers) and the bytes Megatron's loader reads, for N=1 vs all
  layers, compared as ratios with wide margins (never seconds).
* `--layers` / `--nproc` bad input: one line, exit 2, before any work.

The logits checks of `verify --layers` (pass at PP2, fail for a corrupted compared layer, layers
beyond N covered by the tensor check only) run torchrun and are in
tests/distributed/test_convert_layouts.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rift_megatron.convert import mcore_to_hf as mcore_to_hf_module
from rift_megatron.convert import verify as verify_module
from rift_megatron.convert.checkpoint_files import find_hf_assets, load_architecture
from rift_megatron.convert.dcp_reader import read_metadata
from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from rift_megatron.convert.mcore_to_hf import convert_mcore_to_hf
from rift_megatron.models.presets import tiny_hf_config
from tests.unit.test_convert import (
    assert_bit_identical,
    assert_one_error_line,
    build_hf_model,
    leftovers,
    read_hf_tensors,
    run_cli,
    run_subprocess,
)

EXPORT_SHARD = "300KB"  # the 3.5 MB Llama test model -> 12 shard files

# Layers dominate: per layer 4 x 512 x 128 x 2 (attention) + 3 x 512 x 2048 (MLP) = 3.9M
# parameters, against 0.5M for the embedding and for the head (vocab 1001).
LARGE_LAYERS = dict(
    vocab_size=1001, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=128, torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer Llama test model, its checkpoint, and its export by one process."""
    root = tmp_path_factory.mktemp("convert_scale")
    hf = build_hf_model(root / "hf", "llama")
    ckpt = convert_hf_to_mcore(hf, root / "ckpt")
    export = convert_mcore_to_hf(ckpt, root / "export-nproc1", max_shard_size=EXPORT_SHARD)
    return {"root": root, "hf": hf, "ckpt": ckpt, "export": export}


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------
# mcore-to-hf --nproc
# --------------------------------------------------------------------------------------------


@pytest.mark.distributed  # two spawned export processes
def test_mcore_to_hf_nproc2_is_byte_identical_to_nproc1(llama, tmp_path, monkeypatch):
    """Two processes, each given whole shard files (spied on the way in, then run for real),
    write the same files with the same bytes as one process: shards, index, config, tokenizer."""
    jobs: list[tuple] = []
    real = mcore_to_hf_module.run_in_processes

    def spy(worker, job_list):
        jobs.extend(job_list)
        return real(worker, job_list)

    monkeypatch.setattr(mcore_to_hf_module, "run_in_processes", spy)
    out = convert_mcore_to_hf(llama["ckpt"], tmp_path / "export-nproc2", max_shard_size=EXPORT_SHARD, nproc=2)

    # the work really was split: two jobs, disjoint whole files covering every shard, ~equal bytes
    shard_files = sorted(p.name for p in llama["export"].glob("*.safetensors"))
    assert len(shard_files) >= 6, shard_files
    assert len(jobs) == 2
    shares = [set(job[3]) for job in jobs]
    assert shares[0].isdisjoint(shares[1]) and sorted(shares[0] | shares[1]) == shard_files
    sizes = [sum((llama["export"] / name).stat().st_size for name in share) for share in shares]
    largest_shard = max((llama["export"] / name).stat().st_size for name in shard_files)
    assert abs(sizes[0] - sizes[1]) <= largest_shard, sizes

    one, two = _file_bytes(llama["export"]), _file_bytes(out)
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name] == two[name], f"{name} differs between --nproc 1 and --nproc 2"
    # and both are the source model, bit for bit
    assert_bit_identical(read_hf_tensors(out), read_hf_tensors(llama["hf"]))
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].keys() == \
        read_hf_tensors(llama["hf"]).keys()
    assert not leftovers(out)


def _truncate_last_stored_tensor(ckpt: Path) -> list[str]:
    """Cut the .distcp file just inside the tensor stored last in it: only the export process
    whose shard needs that tensor can fail (here model.norm.weight, in the last shard)."""
    storage = read_metadata(ckpt).storage_data
    index, info = max(storage.items(), key=lambda item: item[1].offset)
    os.truncate(ckpt / info.relative_path, info.offset + 16)
    return [repr(index.fqn), info.relative_path]


def _remove_distcp(ckpt: Path) -> list[str]:
    (distcp,) = ckpt.glob("*.distcp")
    distcp.unlink()
    return [distcp.name]  # found missing where its first stored object or tensor is read


@pytest.mark.distributed  # --nproc 2 cases: two spawned export processes
@pytest.mark.parametrize(
    ("corrupt", "nproc"),
    [(_truncate_last_stored_tensor, 1), (_truncate_last_stored_tensor, 2), (_remove_distcp, 2)],
    ids=["truncated-nproc1", "truncated-nproc2", "removed-nproc2"],
)
def test_unreadable_checkpoint_file_is_one_line_and_leaves_no_output(llama, tmp_path, corrupt, nproc):
    """A cut .distcp file fails one export process (the one that needs the cut tensor; the other
    is stopped), a removed one fails every process: either way the real CLI prints one line
    naming the tensor / file, exits 2 and leaves neither output nor staging directory.

    The checkpoint is one without rift_checksums.json (another tool's), so the damage is found
    where the tensors are read, not up front (that refusal: test_convert_refusals.py); the line
    follows the one warning that its files cannot be checked."""
    ckpt = Path(shutil.copytree(llama["ckpt"], tmp_path / "ckpt"))
    (ckpt / "rift_checksums.json").unlink()
    fragments = corrupt(ckpt)
    out = tmp_path / "export"
    result = run_subprocess(["-m", "rift_megatron.cli", "convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out",
                             str(out), "--max-shard-size", EXPORT_SHARD, "--nproc", str(nproc)],
                            PYTHONWARNINGS="ignore")
    assert result.returncode == 2, result.stderr[-3000:]
    warning, _, rest = result.stderr.strip().partition("\n")
    assert warning.startswith("warning: ") and "rift_checksums.json" in warning, result.stderr[-3000:]
    assert_one_error_line(rest, "cannot read stored", *fragments)
    assert not out.exists() and not leftovers(out)


def test_bad_nproc_is_refused(llama, tmp_path, capsys):
    out = tmp_path / "export"
    code, _, err = run_cli(["convert", "mcore-to-hf", "--ckpt", str(llama["ckpt"]), "--out", str(out),
                            "--nproc", "0"], capsys)
    assert code == 2
    assert_one_error_line(err, "--nproc must be >= 1, got 0")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# verify --layers: bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--layers", "3", "--pp", "2"], ["--layers 3 is not divisible by --pp 2"]),
        (["--layers", "0"], ["--layers must be between 1 and 4", "got 0"]),
        (["--layers", "5"], ["--layers must be between 1 and 4", "got 5"]),
        (["--layers", "2", "--tp", "3"], ["'num_attention_heads'=4", "tensor parallel size 3"]),
    ],
    ids=["not-divisible-by-pp", "zero", "more-than-the-model", "bad-tp"],
)
def test_verify_refuses_bad_layers_in_one_line_before_any_work(llama, capsys, monkeypatch, extra, fragments):
    def no_work(*args, **kwargs):
        raise AssertionError("verify started checking before refusing its arguments")

    monkeypatch.setattr(verify_module, "compare_tensors", no_work)
    monkeypatch.setattr(verify_module, "compare_logits", no_work)
    code, out, err = run_cli(["convert", "verify", "--hf", str(llama["hf"]), "--ckpt", str(llama["ckpt"]), *extra],
                             capsys)
    assert code == 2, out + err
    assert_one_error_line(err, *fragments)


# --------------------------------------------------------------------------------------------
# verify --layers: what each side allocates and reads
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_layers(tmp_path_factory) -> dict[str, Path]:
    """A bf16 Llama whose 8 layers are 94% of its 65 MB, and its checkpoint. Weights are random
    (written from a meta-device model; nothing here computes with them)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("large_layers")
    hf = root / "hf"
    hf.mkdir()
    config = tiny_hf_config("LlamaForCausalLM", **LARGE_LAYERS)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    hf_config.save_pretrained(hf)
    return {"hf": hf, "ckpt": convert_hf_to_mcore(hf, root / "ckpt")}


_REFERENCE_MEMORY = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
# imported before the baseline (modules are not model memory)
import transformers.models.llama.modeling_llama
from transformers import AutoConfig, AutoModelForCausalLM
from rift_megatron.convert.verify import load_reference_model

def memory(field):  # VmRSS now / VmHWM peak: per address space, so not inherited from pytest
    with open("/proc/self/status") as status:  # (ru_maxrss is: Linux keeps it across exec)
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

layers = None if sys.argv[2] == "all" else int(sys.argv[2])
tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
before = memory("VmRSS")
model = load_reference_model(sys.argv[1], layers)
with torch.no_grad():
    model(tokens)  # touches every weight the reference holds
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "growth": memory("VmHWM") - before}))
"""


def _reference_memory(hf: Path, layers: str) -> dict:
    result = run_subprocess(["-c", _REFERENCE_MEMORY, str(hf), layers], PYTHONWARNINGS="ignore")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reference_with_one_layer_allocates_only_that_layer(large_layers):
    """transformers with num_hidden_layers=1 builds 1 layer and does not load the other 7: its
    peak memory (each run in a fresh process; growth after imports, forward pass included) is a
    fraction of the full model's. Measured: 43 MB vs 202 MB (0.21; 2 layers: 60 MB), parameters 5.0M vs
    32.5M; if the skipped layers were read and converted before being dropped, the one-layer
    run would peak like the full one (ratio ~1)."""
    arch = load_architecture(large_layers["hf"])
    one, full = _reference_memory(large_layers["hf"], "1"), _reference_memory(large_layers["hf"], "all")
    assert one["parameters"] == dataclasses.replace(arch, num_layers=1).num_parameters()
    assert full["parameters"] == arch.num_parameters()
    assert one["growth"] < 0.5 * full["growth"], (one, full)


def _bytes_read() -> int:
    with open("/proc/self/io") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("rchar:"))


def _load_megatron(ckpt: Path, layers: int | None) -> tuple[dict[str, torch.Tensor], int]:
    """Weights of a TP1 Megatron model with `layers` layers (None: all) loaded from `ckpt` in this
    process, and the bytes read while loading."""
    from rift_megatron.convert.verify_worker import load_first_layers
    from rift_megatron.models.provider import GPTModelProvider
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.training.checkpoint import load_model_checkpoint
    from rift_megatron.training.setup import build_model_chunks

    arch = load_architecture(find_hf_assets(ckpt))
    init_distributed(cpu_only=True)
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        model_arch = arch if layers is None else dataclasses.replace(arch, num_layers=layers)
        chunks = build_model_chunks(GPTModelProvider(model_arch, ParallelLayout()))
        before = _bytes_read()
        if layers is None:
            load_model_checkpoint(chunks, ckpt)
        else:
            load_first_layers(chunks, ckpt, layers, arch.num_layers)
        read = _bytes_read() - before
        weights = {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
        return weights, read
    finally:
        destroy_model_parallel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/io")
def test_megatron_loads_only_the_first_layers_from_the_full_checkpoint(large_layers):
    """`load_first_layers` (verify_worker, Megatron's own dist_checkpointing.load) gives a 1-layer
    model exactly the full model's embedding, layer 0, final norm and head, and reads a fraction
    of the checkpoint: measured 10.7 MB vs 67 MB for all 8 layers (bf16). Reading all layers
    would make the ratio ~1."""
    one, read_one = _load_megatron(large_layers["ckpt"], 1)
    full, read_full = _load_megatron(large_layers["ckpt"], None)
    assert one.keys() <= full.keys()
    assert any(".layers.0." in key for key in one) and not any(".layers.1." in key for key in one)
    for key, tensor in one.items():  # (a random initialisation left in place would differ)
        assert torch.equal(tensor, full[key]), key
    assert read_one < 0.3 * read_full, (read_one, read_full)

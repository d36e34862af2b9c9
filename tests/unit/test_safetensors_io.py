"""Tests of rift_megatron.convert.safetensors_io on real files.

Bit-exactness is checked with dtype equality plus torch.equal on the values and, for floats, on
the raw bit patterns (nan and -0.0 included): conversion must not change a single bit.
Memory claims are checked where the OS makes them observable: a file mapping in
/proc/self/maps, the file size after each streamed write, tracemalloc (Python-side buffers) and,
in a child process, the peak RSS (VmHWM after resetting it via /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rift_megatron.convert.errors import ConversionError
from rift_megatron.convert.safetensors_io import (
    HFCheckpointReader,
    StreamingSafetensorsWriter,
    TensorInfo,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)

MB = 2**20
linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")


def _specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _write(path: Path, tensors: dict[str, torch.Tensor],
           metadata: dict[str, str] | None = None) -> None:
    with StreamingSafetensorsWriter(path, _specs(tensors), metadata) as w:
        for name, t in tensors.items():
            w.write(name, t)


def _assert_identical(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    assert a.dtype == b.dtype, name
    assert a.shape == b.shape, name
    assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(_bits(a), _bits(b))), name
    if a.is_floating_point():  # torch.equal says -0.0 == 0.0 and nan != nan: compare the bits too
        assert torch.equal(_bits(a), _bits(b)), name


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _mapped(path: Path) -> bool:
    target = str(path.resolve())
    return any(line.rstrip("\n").endswith(target) for line in open("/proc/self/maps"))


# ---------------------------------------------------------------------------- round trip

def _all_kinds() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, 5, generator=g),
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.tensor([-(2**62), -1, 0, 2**62 + 3]),
        "i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 3),
        "noncontig": torch.randn(4, 6, generator=g).t(),  # written through a contiguous copy
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.bfloat16),
    }


def test_round_trip_bit_identical_and_aligned(tmp_path: Path) -> None:
    tensors = _all_kinds()
    path = tmp_path / "x.safetensors"
    _write(path, tensors, {"producer": "rift"})

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert list(header)[1:] == list(tensors)  # data in declared order
    assert len(raw) == 8 + n + sum(t.numel() * t.element_size() for t in tensors.values())

    loaded = load_file(path)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"producer": "rift", "format": "pt"}
    reader = HFCheckpointReader(tmp_path)
    assert reader.names() == sorted(tensors)
    assert reader.files() == [path]
    assert reader.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, t in tensors.items():
        _assert_identical(loaded[name], t, name)
        got = reader.read(name)
        _assert_identical(got, t, name)
        assert got.is_contiguous()
        assert reader.info(name) == TensorInfo(name, tuple(t.shape), t.dtype, path,
                                               t.numel() * t.element_size())


def test_read_returns_tensor_owning_its_memory(tmp_path: Path) -> None:
    _write(tmp_path / "model.safetensors", {"a": torch.arange(10.0), "b": torch.ones(3)})
    reader = HFCheckpointReader(tmp_path)
    a = reader.read("a")
    assert a.untyped_storage().nbytes() == a.numel() * a.element_size()  # no shared file buffer
    a.add_(1)  # writable, and does not touch the file
    _assert_identical(reader.read("a"), torch.arange(10.0))


# ---------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("sharded", [True, False])
def test_reads_transformers_checkpoint(tmp_path: Path, tiny_llama, sharded: bool) -> None:
    kwargs = {"max_shard_size": "20KB"} if sharded else {}
    tiny_llama.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    reader = HFCheckpointReader(tmp_path)
    state = tiny_llama.state_dict()
    assert reader.names() == sorted(state)
    if sharded:
        assert len(reader.files()) > 1
    else:
        assert reader.files() == [tmp_path / "model.safetensors"]
    for name, t in state.items():
        _assert_identical(reader.read(name), t, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_checkpoint_loads_in_transformers(tmp_path: Path, tiny_llama, dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama.to(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tiny_llama.to(torch.float32)
    specs = _specs(state)
    shards = plan_shards(specs, parse_size("20KB"))
    assert len(shards) > 1
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(shard_file_names(len(shards)), shards, strict=True):
        with StreamingSafetensorsWriter(tmp_path / file_name, shard) as w:
            for name, _, _ in shard:
                w.write(name, state[name])
                weight_map[name] = file_name
    write_index(tmp_path, weight_map, sum(t.numel() * t.element_size() for t in state.values()))
    model.config.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    got = loaded.state_dict()
    assert sorted(got) == sorted(state)
    for name, t in state.items():
        _assert_identical(got[name], t, name)


# ---------------------------------------------------------------------------- reader errors

def _raises(model_dir: Path, *fragments: str) -> None:
    with pytest.raises(ConversionError) as e:
        HFCheckpointReader(model_dir)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_missing_directory(tmp_path: Path) -> None:
    _raises(tmp_path / "nope", str(tmp_path / "nope"), "does not exist")


def test_empty_directory(tmp_path: Path) -> None:
    _raises(tmp_path, str(tmp_path), "no *.safetensors")


def test_only_pytorch_bin(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    _raises(tmp_path, ".bin", "not supported", "safe_serialization=True")


def _shard_and_index(tmp_path: Path, weight_map: dict[str, str]) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    write_index(tmp_path, weight_map, 8)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    _shard_and_index(tmp_path, {"a": "model-00001-of-00002.safetensors",
                                "b": "model-00002-of-00002.safetensors"})
    _raises(tmp_path, "names shard model-00002-of-00002.safetensors for tensor 'b'",
            "does not exist")


def test_index_tensor_absent_from_shard(tmp_path: Path) -> None:
    _shard_and_index(tmp_path, {"a": "model-00001-of-00002.safetensors",
                                "ghost": "model-00001-of-00002.safetensors"})
    _raises(tmp_path, "'ghost'", "model-00001-of-00002.safetensors", "no such tensor")


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": [1]}'])
def test_invalid_index(tmp_path: Path, text: str) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(text)
    _raises(tmp_path, "invalid index", "model.safetensors.index.json")


def test_truncated_shard(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, path)
    full = path.stat().st_size
    os.truncate(path, full - 10)
    _raises(tmp_path, str(path), f"is truncated: expected at least {full} bytes, found {full - 10}")


def test_header_garbage(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 8 + b"garbage" * 10)
    _raises(tmp_path, "cannot parse safetensors header", str(path))
    path.write_bytes((16).to_bytes(8, "little") + b"{this is no json" + b"\0" * 8)
    _raises(tmp_path, "cannot parse safetensors header", str(path))
    path.write_bytes(b"abc")
    _raises(tmp_path, "cannot parse safetensors header", str(path))


def test_duplicate_tensor_without_index(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2), "v": torch.ones(1)}, tmp_path / "b.safetensors")
    _raises(tmp_path, "'w'", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))


def test_several_files_without_index_are_merged(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"v": torch.zeros(1)}, tmp_path / "b.safetensors")
    reader = HFCheckpointReader(tmp_path)
    assert reader.names() == ["v", "w"]
    assert reader.info("v").file == tmp_path / "b.safetensors"


def test_unsupported_dtype(tmp_path: Path) -> None:
    header = json.dumps({"fp8_w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
    header += " " * (-len(header) % 8)
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header.encode() + b"\0\0")
    _raises(tmp_path, "'fp8_w'", "F8_E4M3", "unsupported dtype")


def test_unknown_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"tensor 'b' not found in .*"):
        HFCheckpointReader(tmp_path).read("b")


# ---------------------------------------------------------------------------- writer errors

SPECS = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]


def test_writer_wrong_order(tmp_path: Path) -> None:
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", SPECS)
    with pytest.raises(ValueError, match=r"tensor 'b' .* out of order: expected 'a'"):
        w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    w.abort()


def test_writer_wrong_shape_and_dtype(tmp_path: Path) -> None:
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", SPECS)
    with pytest.raises(ValueError, match=r"'a': declared \[2, 3\] torch.float32, got \[3, 2\]"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"tensor 'a': .* got \[2, 3\] torch.float64"):
        w.write("a", torch.zeros(2, 3, dtype=torch.float64))
    w.write("a", torch.zeros(2, 3))  # a rejected write left the writer usable
    w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"tensor 'c': all tensors declared for .* are written"):
        w.write("c", torch.zeros(1))
    w.close()
    assert load_file(tmp_path / "x.safetensors")["a"].shape == (2, 3)


def test_writer_missing_tensor_at_close_removes_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    w = StreamingSafetensorsWriter(path, SPECS)
    w.write("a", torch.zeros(2, 3))
    assert path.exists()
    with pytest.raises(ValueError, match=r"never written \(first: 'b'\)"):
        w.close()
    assert not path.exists()


def test_writer_exception_inside_with_removes_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingSafetensorsWriter(path, SPECS) as w:
            w.write("a", torch.zeros(2, 3))
            raise RuntimeError("boom")
    assert not path.exists()


def test_writer_rejects_bad_declarations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        StreamingSafetensorsWriter(tmp_path / "x.safetensors", SPECS + SPECS[:1])
    with pytest.raises(ValueError, match="'c'.*complex64 is not supported"):
        StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("c", (1,), torch.complex64)])
    with pytest.raises(ValueError, match=r"'n': shape \[-1\]"):
        StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("n", (-1,), torch.float32)])
    with pytest.raises(ValueError, match="str -> str"):
        StreamingSafetensorsWriter(tmp_path / "x.safetensors", SPECS, {"step": 3})  # type: ignore


# ---------------------------------------------------------------------------- memory

def _big(i: int) -> torch.Tensor:
    """An 8 MB float32 tensor whose content depends on i (so mix-ups are detected)."""
    return torch.arange(2 * MB, dtype=torch.float32).add_(i)


@linux_only
def test_reader_never_keeps_file_mapped(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _write(path, {f"t{i}": _big(i) for i in range(8)})
    with safe_open(path, "pt") as f:  # positive control: the maps check does see an mmap
        f.get_tensor("t0")
        assert _mapped(path)
    assert not _mapped(path)
    reader = HFCheckpointReader(tmp_path)
    for i in range(8):
        t = reader.read(f"t{i}")
        assert not _mapped(path)
        _assert_identical(t, _big(i))


def test_writer_streams_tensor_by_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    specs = [(f"t{i}", (2 * MB,), torch.float32) for i in range(8)]
    tracemalloc.start()
    try:
        with StreamingSafetensorsWriter(path, specs) as w:
            assert path.stat().st_size == w.data_start  # header is on disk before any tensor
            for i in range(8):
                w.write(f"t{i}", _big(i))
                assert path.stat().st_size == w.data_start + (i + 1) * 8 * MB
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # No Python-side copy of even one 8 MB tensor (e.g. tensor.numpy().tobytes()), let alone 64 MB.
    assert peak < 4 * MB, peak
    assert torch.equal(load_file(path)["t7"], _big(7))


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from rift_megatron.convert.safetensors_io import HFCheckpointReader, StreamingSafetensorsWriter
    d, n, MB = Path(sys.argv[1]), 16, 2**20
    big = lambda i: torch.arange(2 * MB, dtype=torch.float32).add_(i)  # one 8 MB allocation
    def rss(key):
        line = next(l for l in open("/proc/self/status") if l.startswith(key))
        return int(line.split()[1]) * 1024
    for i in range(3):  # warm up allocator and code paths so their one-off cost is not counted
        big(i).sum()
    base = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to the current RSS
    with StreamingSafetensorsWriter(d / "model.safetensors",
                                    [(f"t{i}", (2 * MB,), torch.float32) for i in range(n)]) as w:
        for i in range(n):
            w.write(f"t{i}", big(i))
    reader = HFCheckpointReader(d)
    for i in range(n):
        assert torch.equal(reader.read(f"t{i}"), big(i))
    print(rss("VmHWM:") - base)
""")


@linux_only
def test_peak_rss_bounded_by_tensor_not_file(tmp_path: Path) -> None:
    """Writing then reading a 128 MB file of 8 MB tensors: peak RSS grows far less than 128 MB."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("cannot reset peak RSS via /proc/self/clear_refs here")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.split()[-1])
    assert growth < 48 * MB, f"peak RSS grew by {growth / MB:.0f} MB for a 128 MB file"


# ---------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("100KB", 100_000),
    ("123", 123), ("70.5GB", 70_500_000_000), (" 1 mib ", 2**20), ("64B", 64),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-5GB", "0", "five", "5 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_shard_file_names() -> None:
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert shard_file_names(12)[-1] == "model-00012-of-00012.safetensors"
    with pytest.raises(ValueError):
        shard_file_names(0)


def test_plan_shards_greedy_in_order() -> None:
    f32 = torch.float32
    specs = [("a", (10,), f32), ("b", (10,), f32), ("c", (5,), f32), ("d", (15,), f32),
             ("e", (100,), f32), ("f", (1,), f32), ("g", (), torch.bfloat16)]
    shards = plan_shards(specs, 80)  # a+b and c+d fill 80 bytes exactly; e alone
    assert [[s[0] for s in sh] for sh in shards] == [["a", "b"], ["c", "d"], ["e"], ["f", "g"]]
    assert plan_shards(specs, 10**9) == [specs]
    assert plan_shards([], 10) == []
    with pytest.raises(ValueError):
        plan_shards(specs, 0)


def test_plan_shards_oversize_tensor_alone_at_start() -> None:
    specs = [("big", (1000,), torch.float32), ("small", (1,), torch.float32)]
    assert plan_shards(specs, 100) == [[specs[0]], [specs[1]]]


def test_write_index(tmp_path: Path) -> None:
    write_index(tmp_path, {"z": "model-00002-of-00002.safetensors",
                           "a": "model-00001-of-00002.safetensors"}, 1234)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 1234},
                     "weight_map": {"a": "model-00001-of-00002.safetensors",
                                    "z": "model-00002-of-00002.safetensors"}}
    assert list(index["weight_map"]) == ["a", "z"]

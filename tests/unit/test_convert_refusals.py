"""`rift convert` prints its result and nothing else, and refuses a bad checkpoint or layout in one
line before any Megatron worker starts (the real CLI in a subprocess; tests/cli_refusals.py).

Quiet: Megatron warns at import that Transformer Engine and Apex are missing (conversion runs no
kernels), PyTorch DCP that it reads in one process (on purpose), Megatron again that its own default
CUDA-graph scope is deprecated: ~14 lines before every result, in the CLI and its --nproc workers.
Refusals: a `.distcp` cut short (an interrupted copy), a checkpoint whose hf_assets/config.json
does not describe its tensors (verify used to start its torchrun workers and print their 60-line
tracebacks), and a --tp / --pp that cannot split the model.
The model is the shared tiny Llama of tests/rollout_fixtures.py (4 layers, 4 heads, 2 KV heads).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.cli_refusals import assert_refused, run_rift
from tests.rollout_fixtures import shared_tiny_model

DATA_FILE = "__0_0.distcp"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    return shared_tiny_model(tmp_path_factory)


def _checkpoint_copy(model: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(model["mcore"], tmp_path / "ckpt"))


def _rerecord_checksums(checkpoint: Path) -> None:
    """Make the edited checkpoint consistent with its checksum listing, if it has one: the case is
    a checkpoint written this way (a faulty tool), not one changed afterwards."""
    if (checkpoint / "rift_checksums.json").is_file():
        from rift_megatron.trust.checksums import write_checksums

        write_checksums(checkpoint)


def test_a_conversion_prints_its_result_and_nothing_else(model, tmp_path):
    checkpoint, export = tmp_path / "ckpt", tmp_path / "export"
    # real interpreters: nothing printed while importing either (the other cases run in forks)
    result = run_rift("convert", "hf-to-mcore", "--hf", str(model["hf"]), "--out", str(checkpoint), fresh=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-4000:]
    assert result.stdout.strip() == f"wrote Megatron checkpoint {checkpoint}"
    # two spawned writer processes import Megatron too
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(export), "--nproc", "2",
                      fresh=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-4000:]
    assert result.stdout.strip() == f"wrote Hugging Face model {export}"


@pytest.mark.parametrize("step", ["mcore-to-hf", "verify"])
def test_a_truncated_data_file_is_one_line_naming_it(model, tmp_path, step):
    checkpoint = _checkpoint_copy(model, tmp_path)
    data = checkpoint / DATA_FILE
    os.truncate(data, data.stat().st_size // 2)
    out = tmp_path / "out"
    args = ["--out", str(out)] if step == "mcore-to-hf" else ["--hf", str(model["hf"]), "--json", str(out)]
    result = run_rift("convert", step, "--ckpt", str(checkpoint), *args)
    assert_refused(result, "convert", DATA_FILE, "truncated")
    assert not out.exists()


def test_a_truncated_data_file_without_checksums_is_named_when_read(model, tmp_path):
    """A checkpoint with no rift_checksums.json (another tool's) gets its warning line; the cut
    file is then found where its tensor is read, and named (DCP's own error is a bare EOFError)."""
    checkpoint = _checkpoint_copy(model, tmp_path)
    (checkpoint / "rift_checksums.json").unlink()
    data = checkpoint / DATA_FILE
    os.truncate(data, data.stat().st_size // 2)
    out = tmp_path / "out"
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 2, result.stderr[-4000:]
    assert lines[0].startswith("warning:") and "rift_checksums.json" in lines[0], lines[0]
    assert lines[1].startswith("rift convert: error: ") and DATA_FILE in lines[1] and "truncated" in lines[1], lines[1]
    assert not out.exists()


def test_verify_refuses_a_checkpoint_whose_config_contradicts_its_tensors(model, tmp_path):
    """Before: its Megatron workers failed to load the checkpoint, 61 lines of tracebacks."""
    checkpoint = _checkpoint_copy(model, tmp_path)
    config_path = checkpoint / "hf_assets" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] *= 2
    config_path.write_text(json.dumps(config))
    _rerecord_checksums(checkpoint)
    out = tmp_path / "report.json"
    result = run_rift("convert", "verify", "--hf", str(model["hf"]), "--ckpt", str(checkpoint), "--json", str(out))
    assert_refused(result, "convert", "hf_assets/config.json", "'decoder.layers.mlp.linear_fc1.weight'",
                   "[4, 512, 128]")
    assert not out.exists()


@pytest.mark.parametrize(("layout", "field"), [(["--tp", "4"], "'num_key_value_heads'=2"),
                                               (["--pp", "3"], "'num_hidden_layers'=4")], ids=["tp4", "pp3"])
def test_verify_refuses_a_layout_that_cannot_split_the_model(model, tmp_path, layout, field):
    out = tmp_path / "report.json"
    result = run_rift("convert", "verify", "--hf", str(model["hf"]), "--ckpt", str(model["mcore"]), *layout,
                      "--json", str(out))
    assert_refused(result, "convert", " ".join(layout), field, "hf_assets/config.json")
    assert not out.exists()

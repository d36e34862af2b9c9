"""Checkpoints are data (issue 14, items 1 and 2).

1. A pickled payload planted in any pickled file a command reads (a converted checkpoint's
   `.metadata`, `common.pt` and a stored object inside a `.distcp`; a training checkpoint's
   `.metadata`, `common.pt`, stored object and `rng/rank_00000.pt`) is refused by the real CLI
   (`mcore-to-hf`, `verify`, `eval --ckpt`, `train model.mcore_ckpt=...`, `train --resume`) with
   exit 2 and one line naming the file and the refused global, and the payload does not run
   (its marker file is not created). The planted checkpoints carry checksums recomputed over the
   planted files, as an attacker would write them, so it is the unpickling that must refuse.
   `test_planted_payloads_are_live` shows each payload runs under plain unpickling, so a refusal
   test that passes is not passing because the payload was inert.
2. A flipped byte in a `.distcp` is refused instead of exported or resumed: by the checksums of
   `rift_checksums.json`, and, for a converted checkpoint without them (written before they
   existed), by the per-tensor sha256 of `rift_manifest.json`, with one warning line saying the
   files themselves cannot be checked.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")

from tests.cli_refusals import assert_refused, run_rift  # noqa: E402
from tests.rollout_fixtures import arithmetic_prompts, scored_buffer, shared_tiny_model, write_jsonl  # noqa: E402

from rift_megatron.trust.checksums import CHECKSUMS_FILE, write_checksums  # noqa: E402
from rift_megatron.trust.unpickle import METADATA_FILE, read_dcp_metadata  # noqa: E402
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402
from torch.distributed.checkpoint.metadata import BytesStorageMetadata  # noqa: E402


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_metadata(checkpoint: Path, metadata) -> None:
    with open(checkpoint / METADATA_FILE, "wb") as handle:
        pickle.dump(metadata, handle)


def plant_in_metadata(checkpoint: Path, marker: Path) -> str:
    """The payload as a field of otherwise valid metadata: a plain reader runs it and loads on."""
    metadata = read_dcp_metadata(checkpoint / METADATA_FILE)
    metadata.storage_meta.checkpoint_id = Payload(marker)
    _write_metadata(checkpoint, metadata)
    return METADATA_FILE


def plant_in_common(checkpoint: Path, marker: Path) -> str:
    torch.save({"payload": Payload(marker)}, checkpoint / "common.pt")
    return "common.pt"


def plant_in_stored_object(checkpoint: Path, marker: Path) -> str:
    """Append a torch-saved payload to a `.distcp` and point a stored object (`_extra_state`) at it."""
    metadata = read_dcp_metadata(checkpoint / METADATA_FILE)
    index, info = next((index, info) for index, info in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata))
    blob = io.BytesIO()
    torch.save([Payload(marker)], blob)
    data_file = checkpoint / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as handle:
        handle.write(blob.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
    _write_metadata(checkpoint, metadata)
    return info.relative_path


def plant_in_rng(checkpoint: Path, marker: Path) -> str:
    torch.save({"python": Payload(marker)}, checkpoint / "rng" / "rank_00000.pt")
    return "rng/rank_00000.pt"


PLANTS = {"metadata": plant_in_metadata, "common": plant_in_common, "object": plant_in_stored_object,
          "rng": plant_in_rng}


def flip_a_tensor_byte(checkpoint: Path) -> str:
    """Invert one byte in the middle of the largest stored tensor's data; its file's name."""
    metadata = read_dcp_metadata(checkpoint / METADATA_FILE)
    info = max(metadata.storage_data.values(), key=lambda item: item.length)
    path = checkpoint / info.relative_path
    with open(path, "r+b") as handle:
        handle.seek(info.offset + info.length // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return info.relative_path


def _train_args(model: dict, buffer: Path, run: Path, steps: int) -> list[str]:
    return ["train", f"model.hf_dir={model['hf']}", f"model.mcore_ckpt={model['mcore']}", "algorithm.name=sft",
            "data.mode=offline", f"data.buffer={buffer}", f"training.steps={steps}", "training.global_batch_size=4",
            "training.micro_batch_size=4", f"checkpoint.dir={run / 'checkpoints'}", "checkpoint.interval=1",
            f"logging.dir={run}", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """The shared tiny model (its converted checkpoint), an offline buffer and a one-step
    training run with its checkpoint."""
    model = shared_tiny_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("checkpoint-trust")
    buffer = scored_buffer(model["hf"], arithmetic_prompts(2, seed=3), root / "buffer")
    run = root / "run"
    result = run_rift(*_train_args(model, buffer, run, steps=1), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"model": model, "buffer": buffer, "run": run, "root": root,
            "prompts": write_jsonl(root / "prompts.jsonl", arithmetic_prompts(2))}


def _converted_copy(work: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(work["model"]["mcore"], tmp_path / "mcore"))


def _run_copy(work: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the training run; (run directory, its step-1 checkpoint)."""
    run = Path(shutil.copytree(work["run"], tmp_path / "run"))
    return run, run / "checkpoints" / "iter_0000001"


def _planted(checkpoint: Path, plant: str, marker: Path) -> str:
    """Plant, then re-record the checksums as an attacker would; the planted file's path."""
    name = PLANTS[plant](checkpoint, marker)
    write_checksums(checkpoint)
    return str(checkpoint / name)


def _assert_payload_refused(result, command: str, planted: str, marker: Path) -> None:
    line = assert_refused(result, command, planted, "refused to load 'posix.system'")
    assert not marker.exists(), f"the payload ran: {line}"


# ---- the payloads are live ---------------------------------------------------------------------


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_payloads_are_live(work, tmp_path, plant):
    """Control: unpickled the way torch / Megatron read these files, each payload runs."""
    _, checkpoint = _run_copy(work, tmp_path)
    marker = tmp_path / "ran"
    planted = Path(_planted(checkpoint, plant, marker))
    if plant == "metadata":
        with open(planted, "rb") as handle:
            pickle.load(handle)  # FileSystemReader.read_metadata
    elif plant == "object":
        metadata = read_dcp_metadata(checkpoint / METADATA_FILE)
        info = next(info for index, info in metadata.storage_data.items()
                    if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata))
        with open(planted, "rb") as handle:
            handle.seek(info.offset)
            torch.load(io.BytesIO(handle.read(info.length)), weights_only=False)  # DefaultLoadPlanner.load_bytes
    else:
        torch.load(planted, weights_only=False)  # the trainer's rng load before this change
    assert marker.exists()


# ---- converted checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("plant", ["metadata", "common", "object"])
def test_mcore_to_hf_refuses_a_payload_in_a_converted_checkpoint(work, tmp_path, plant):
    checkpoint, marker, out = _converted_copy(work, tmp_path), tmp_path / "ran", tmp_path / "hf"
    planted = _planted(checkpoint, plant, marker)
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(out))
    _assert_payload_refused(result, "convert", planted, marker)
    assert not out.exists()


def test_verify_refuses_a_payload_in_metadata(work, tmp_path):
    checkpoint, marker = _converted_copy(work, tmp_path), tmp_path / "ran"
    planted = _planted(checkpoint, "metadata", marker)
    result = run_rift("convert", "verify", "--hf", str(work["model"]["hf"]), "--ckpt", str(checkpoint))
    _assert_payload_refused(result, "convert", planted, marker)


def test_eval_refuses_a_payload_in_a_stored_object(work, tmp_path):
    checkpoint, marker = _converted_copy(work, tmp_path), tmp_path / "ran"
    planted = _planted(checkpoint, "object", marker)
    result = run_rift("eval", "--ckpt", str(checkpoint), "--prompts", str(work["prompts"]),
                      "--max-tokens", "8", "--out", str(tmp_path / "eval.json"))
    _assert_payload_refused(result, "eval", planted, marker)


@pytest.mark.parametrize("plant", ["metadata", "common"])
def test_train_refuses_a_payload_in_its_initial_checkpoint(work, tmp_path, plant):
    checkpoint, marker = _converted_copy(work, tmp_path), tmp_path / "ran"
    planted = _planted(checkpoint, plant, marker)
    model = dict(work["model"], mcore=checkpoint)
    result = run_rift(*_train_args(model, work["buffer"], tmp_path / "run", steps=1), timeout=600)
    _assert_payload_refused(result, "train", planted, marker)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- training checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_resume_refuses_a_payload_in_a_training_checkpoint(work, tmp_path, plant):
    run, checkpoint = _run_copy(work, tmp_path)
    marker = tmp_path / "ran"
    planted = _planted(checkpoint, plant, marker)
    result = run_rift(*_train_args(work["model"], work["buffer"], run, steps=2), "--resume", "auto", timeout=600)
    _assert_payload_refused(result, "train", planted, marker)
    assert not (run / "checkpoints" / "iter_0000002").exists()


def test_mcore_to_hf_refuses_a_payload_in_a_training_checkpoint(work, tmp_path):
    run, checkpoint = _run_copy(work, tmp_path)
    marker, out = tmp_path / "ran", tmp_path / "hf"
    planted = _planted(checkpoint, "metadata", marker)
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(run / "checkpoints"), "--out", str(out))
    _assert_payload_refused(result, "convert", planted, marker)
    assert not out.exists()


# ---- corruption ----------------------------------------------------------------------------------


def test_every_checkpoint_written_records_checksums_and_loads_without_a_warning(work, tmp_path):
    for checkpoint in (work["model"]["mcore"], work["run"] / "checkpoints" / "iter_0000001"):
        assert (checkpoint / CHECKSUMS_FILE).is_file(), checkpoint
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(work["run"] / "checkpoints"), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert not [line for line in result.stderr.splitlines() if line.startswith("warning: ")], result.stderr


def test_mcore_to_hf_refuses_a_flipped_byte_in_a_converted_checkpoint(work, tmp_path):
    checkpoint, out = _converted_copy(work, tmp_path), tmp_path / "hf"
    flipped = flip_a_tensor_byte(checkpoint)
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(out))
    assert_refused(result, "convert", str(checkpoint / flipped), "sha256", CHECKSUMS_FILE)
    assert not out.exists()


def test_a_converted_checkpoint_without_checksums_is_checked_against_its_manifest(work, tmp_path):
    """A checkpoint converted before rift_checksums.json existed: one warning line, then the
    manifest's per-tensor sha256 catch the flipped byte, naming the tensor and its file."""
    checkpoint, out = _converted_copy(work, tmp_path), tmp_path / "hf"
    (checkpoint / CHECKSUMS_FILE).unlink()
    flipped = flip_a_tensor_byte(checkpoint)
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-4000:]
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    errors = [line for line in result.stderr.splitlines() if line.startswith("rift convert: error: ")]
    assert len(warned) == 1 and CHECKSUMS_FILE in warned[0] and str(checkpoint) in warned[0], result.stderr
    assert len(errors) == 1 and "tensor '" in errors[0], result.stderr
    assert flipped in errors[0] and "rift_manifest.json" in errors[0], errors[0]
    assert not out.exists() and not any(p.name.startswith(".hf.") for p in tmp_path.iterdir())


def test_resume_and_export_refuse_a_flipped_byte_in_a_training_checkpoint(work, tmp_path):
    run, checkpoint = _run_copy(work, tmp_path)
    flipped = str(checkpoint / flip_a_tensor_byte(checkpoint))
    result = run_rift(*_train_args(work["model"], work["buffer"], run, steps=2), "--resume", "auto", timeout=600)
    assert_refused(result, "train", flipped, "sha256")
    assert not (run / "checkpoints" / "iter_0000002").exists()
    result = run_rift("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert_refused(result, "convert", flipped, "sha256")

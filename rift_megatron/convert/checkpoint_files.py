"""What a rift-megatron Megatron checkpoint directory holds besides the tensors.

    <ckpt>/metadata.json, common.pt, .metadata, __*.distcp   Megatron dist_checkpointing (torch_dist)
    <ckpt>/hf_assets/                                        the source config.json, generation
                                                             config and tokenizer files, verbatim
    <ckpt>/rift_manifest.json                                how it was made: source, dtype, and
                                                             per-tensor names, shapes, checksums

Training runs (see the trainer) write iterations under a run directory with a `latest` file naming
the newest complete one; `resolve_checkpoint` accepts either form.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rift_megatron.convert.errors import ConversionError
from rift_megatron.models.hf_config import ModelArchitecture, ModelConfigError, load_hf_config

HF_ASSETS = "hf_assets"
MANIFEST = "rift_manifest.json"
LATEST = "latest"
# Files of an HF model directory that are weights (converted, not copied).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_hf_assets(hf_dir: Path, destination: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (everything that is not weights)."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(hf_dir.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _WEIGHT_INDEXES:
            shutil.copy2(path, destination / path.name)
            copied.append(path.name)
    return copied


def resolve_checkpoint(path: str | Path) -> Path:
    """The dist_checkpointing directory for `path`: itself, or the one its `latest` names."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: checkpoint directory does not exist")
    if (path / "metadata.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "metadata.json").is_file():
            return target
        raise ConversionError(f"{latest} names {target.name}, which is not a complete checkpoint")
    raise ConversionError(
        f"{path}: not a Megatron checkpoint (no metadata.json, and no '{LATEST}' file naming one)"
    )


def find_hf_assets(checkpoint: Path) -> Path:
    """The hf_assets folder of a checkpoint (in it, or in its run directory)."""
    for candidate in (checkpoint / HF_ASSETS, checkpoint.parent / HF_ASSETS):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConversionError(
        f"{checkpoint}: no {HF_ASSETS}/config.json next to the checkpoint, so the model architecture "
        "is unknown (checkpoints written by `rift convert hf-to-mcore` and the trainer have one)"
    )


def checkpoint_hf_assets(path: str | Path) -> Path:
    """The hf_assets folder of the checkpoint `path` names (itself, or its run's `latest`)."""
    return find_hf_assets(resolve_checkpoint(path))


def load_architecture(model_dir: Path) -> ModelArchitecture:
    """config.json -> architecture, with config problems reported as conversion errors."""
    try:
        return load_hf_config(model_dir)
    except ModelConfigError as error:
        raise ConversionError(str(error)) from None


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")

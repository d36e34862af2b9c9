"""The sha256 of every file of a checkpoint, recorded when it is written and checked before use.

A flipped byte in a `.distcp` file is not detected by PyTorch or Megatron: the tensor simply
loads with a wrong value. Every checkpoint rift-megatron writes (`rift convert hf-to-mcore`,
model and training checkpoints) therefore gets `rift_checksums.json`, written last into the
staging directory, before the rename that makes the checkpoint visible; every load checks it.

    {"algorithm": "sha256", "files": {"<relative path>": {"size": <bytes>, "sha256": "<hex>"}}}

Hashing a 1 TB checkpoint takes one process minutes, so the ranks that write the data files hash
their own right after writing them (`record_partial_checksums`, in the background writer when the
save is asynchronous) into a hidden partial listing; `write_checksums` takes those digests for
files of the recorded size, hashes the rest (metadata, small files) and removes the partials.

Files added to the directory later are not listed and not checked (nothing we load is outside
the listed files: `.metadata` names the data files, and it is listed). Folders the writer names
as `unlisted` are left out too: `hf_assets/` (config and tokenizer files copied from the source
model), which may be kept once per run directory instead of in each checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

from rift_megatron.trust.errors import UntrustedCheckpointError

CHECKSUMS_FILE = "rift_checksums.json"
PARTIAL_PREFIX = ".rift_checksums_part_"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def record_partial_checksums(directory: Path, pattern: str, part: str) -> None:
    """Hash the files of `directory` matching `pattern` (a writer's own data files) into the
    hidden partial listing `part`, for `write_checksums` to take instead of reading them again."""
    listing = {path.name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
               for path in sorted(directory.glob(pattern)) if path.is_file()}
    (directory / f"{PARTIAL_PREFIX}{part}.json").write_text(json.dumps(listing))


def _take_partial_checksums(directory: Path) -> dict[str, dict]:
    """Every partial listing's entries, the partial files removed."""
    known: dict[str, dict] = {}
    for path in sorted(directory.glob(f"{PARTIAL_PREFIX}*.json")):
        known.update(json.loads(path.read_text()))
        path.unlink()
    return known


def write_checksums(directory: Path, unlisted: Collection[str] = ()) -> None:
    """Record every file under `directory` but those in its `unlisted` folders (call when
    nothing else will be written to it). A file with a partial listing's digest of its current
    size (`record_partial_checksums`) is not read again."""
    known = _take_partial_checksums(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file() and path.name != CHECKSUMS_FILE
                   and path.relative_to(directory).parts[0] not in unlisted)

    def entry(path: Path) -> dict:
        name, size = path.relative_to(directory).as_posix(), path.stat().st_size
        recorded = known.get(name)
        if recorded is not None and recorded["size"] == size:
            return recorded
        return {"size": size, "sha256": file_sha256(path)}

    listing = {path.relative_to(directory).as_posix(): entry(path) for path in files}
    payload = {"algorithm": "sha256", "files": listing}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(payload, indent=1) + "\n")


def _listing(directory: Path) -> dict[str, dict]:
    path = directory / CHECKSUMS_FILE
    try:
        payload = json.loads(path.read_text())
        listing = payload["files"]
        if payload.get("algorithm") != "sha256" or not isinstance(listing, dict):
            raise ValueError("not a sha256 listing")
        return {str(name): {"size": int(entry["size"]), "sha256": str(entry["sha256"])} for name, entry in listing.items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UntrustedCheckpointError(f"{path}: not a valid checksum listing ({type(error).__name__}: {error})") from None


def verify_checksums(directory: Path) -> bool:
    """Check every file `rift_checksums.json` lists; False if the checkpoint has no such file.

    Raises UntrustedCheckpointError naming the first file that is missing, of another size or
    with another sha256 than recorded.
    """
    if not (directory / CHECKSUMS_FILE).is_file():
        return False
    for name, expected in _listing(directory).items():
        path = directory / name
        if not path.is_file():
            raise UntrustedCheckpointError(f"{path}: missing (listed in {CHECKSUMS_FILE})")
        size = path.stat().st_size
        if size != expected["size"]:
            raise UntrustedCheckpointError(f"{path}: {size} bytes, but {CHECKSUMS_FILE} recorded {expected['size']} "
                                           "(truncated or changed after the checkpoint was written)")
        if file_sha256(path) != expected["sha256"]:
            raise UntrustedCheckpointError(f"{path}: sha256 differs from the one {CHECKSUMS_FILE} recorded "
                                           "(corrupted or changed after the checkpoint was written)")
    return True

"""A checkpoint's checksums are computed by the ranks that write its data files, not by rank 0
reading the whole checkpoint back (minutes at 1 TB, while training waits for the finalize step).

The partial listings are the mechanism (rift_megatron/trust/checksums.py): a writer's digests are
taken for files of the recorded size, anything else is hashed in the finalize step, and the
partial files are gone from the finished checkpoint. The second test runs a real Megatron-Core
save through `CheckpointWriter` (gloo, one process) and looks at the staging directory inside
the finalize step, where the writer's digests must already be, equal to a fresh hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rift_megatron.trust.checksums import (CHECKSUMS_FILE, PARTIAL_PREFIX, file_sha256, record_partial_checksums,
                                           verify_checksums, write_checksums)


def _listing(directory: Path) -> dict:
    return json.loads((directory / CHECKSUMS_FILE).read_text())["files"]


def test_a_writers_digest_is_taken_for_its_file_and_every_other_file_is_hashed(tmp_path):
    (tmp_path / "__0_0.distcp").write_bytes(b"data written by rank 0")
    (tmp_path / "__0_1.distcp").write_bytes(b"more data")
    (tmp_path / ".metadata").write_bytes(b"written by the finalize step")
    record_partial_checksums(tmp_path, "__0_*.distcp", "rank00000")
    partial = tmp_path / f"{PARTIAL_PREFIX}rank00000.json"
    recorded = json.loads(partial.read_text())
    assert sorted(recorded) == ["__0_0.distcp", "__0_1.distcp"]
    # A digest the finalize step could not have computed: taken as recorded, so the file was not read again.
    recorded["__0_0.distcp"]["sha256"] = "0" * 64
    partial.write_text(json.dumps(recorded))
    (tmp_path / "__0_1.distcp").write_bytes(b"rewritten after it was hashed")  # another size: hashed again
    write_checksums(tmp_path)
    listing = _listing(tmp_path)
    assert listing["__0_0.distcp"]["sha256"] == "0" * 64
    assert listing["__0_1.distcp"]["sha256"] == file_sha256(tmp_path / "__0_1.distcp")
    assert listing[".metadata"]["sha256"] == file_sha256(tmp_path / ".metadata")
    assert not list(tmp_path.glob(f"{PARTIAL_PREFIX}*")) and not any(PARTIAL_PREFIX in name for name in listing)


def test_a_checkpoint_writer_hashes_its_own_data_files_before_the_finalize_step(tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from rift_megatron.parallel import ParallelLayout, destroy_model_parallel, init_distributed, init_model_parallel
    from rift_megatron.training.checkpoint_writer import CheckpointWriter

    init_distributed(cpu_only=True)
    init_model_parallel(ParallelLayout(), seed=0)
    try:
        state = {name: ShardedTensor.from_rank_offsets(name, torch.arange(1000, dtype=torch.float32) * i, replica_id=0)
                 for i, name in enumerate(("a", "b", "c"))}
        staging = tmp_path / "staging"
        staging.mkdir()
        seen: dict = {}

        def finalize() -> None:  # runs after Megatron's own finalize steps, as the checkpoint code's does
            partials = list(staging.glob(f"{PARTIAL_PREFIX}*.json"))
            seen["partial"] = {k: v for p in partials for k, v in json.loads(p.read_text()).items()}
            seen["data_files"] = sorted(p.name for p in staging.glob("*.distcp"))
            seen["fresh"] = {name: file_sha256(staging / name) for name in seen["data_files"]}
            write_checksums(staging)

        CheckpointWriter().save(state, staging, finalize)
    finally:
        destroy_model_parallel()
    assert seen["data_files"] and sorted(seen["partial"]) == seen["data_files"]
    assert {name: entry["sha256"] for name, entry in seen["partial"].items()} == seen["fresh"]
    assert verify_checksums(staging) and not list(staging.glob(f"{PARTIAL_PREFIX}*"))

"""The one door into a checkpoint: check its bytes and its pickles, then load.

Every command that reads a Megatron checkpoint (`rift convert mcore-to-hf` and `verify`,
`rift eval --ckpt` through the export, `rift train` with `model.mcore_ckpt` or a resume) calls
`admit_checkpoint` (or `load_megatron_checkpoint`, which does it) before reading anything else:

1. the files' sha256 against `rift_checksums.json` (a checkpoint without one gets one warning
   line saying that its files cannot be checked);
2. every pickled part through the restricted unpickling of `trust.unpickle`.

A refusal is an UntrustedCheckpointError: one line naming the file, exit code 2, nothing run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rift_megatron.trust.checksums import CHECKSUMS_FILE, verify_checksums
from rift_megatron.trust.errors import UntrustedCheckpointError


def admit_checkpoint(directory: Path, checksums: bool = True) -> None:
    """Refuse `directory` unless its recorded checksums match and its pickles hold only data.
    `checksums=False`: the caller's parent process has just checked them (verify's workers), so
    only the pickles are checked here (reading every file again would defeat `verify --layers`)."""
    from rift_megatron.trust.unpickle import check_pickled_parts

    if checksums and not verify_checksums(directory):
        print(f"warning: {directory}: no {CHECKSUMS_FILE} (written by another tool or an older rift-megatron), "
              "so its files cannot be checked for corruption", file=sys.stderr)
    check_pickled_parts(directory)


def admit_checkpoint_collectively(directory: Path, checksums: bool = True) -> None:
    """`admit_checkpoint` on global rank 0 (the files are read once, not once per rank); every
    rank raises the same error if it refused."""
    import torch.distributed as dist

    if not dist.is_initialized():
        admit_checkpoint(directory, checksums)
        return
    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            admit_checkpoint(directory, checksums)
        except UntrustedCheckpointError as error:
            outcome[0] = str(error)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise UntrustedCheckpointError(outcome[0])


def load_megatron_checkpoint(sharded_state_dict: dict, directory: Path, checksums: bool = True,
                             **options: Any) -> dict:
    """Collective: admit `directory`, then `megatron.core.dist_checkpointing.load` it (with
    `options`) with DCP's metadata and object reads restricted and `common.pt` loaded
    `weights_only=True` whatever the environment says."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    from rift_megatron.trust.unpickle import load_weights_only, restricted_dcp_loading

    class WeightsOnlyCommonLoad(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = Path(checkpoint_dir) / COMMON_STATE_FNAME
            return load_weights_only(path, path)

    admit_checkpoint_collectively(directory, checksums)
    with restricted_dcp_loading():
        return dist_checkpointing.load(sharded_state_dict, str(directory), common_strategy=WeightsOnlyCommonLoad(),
                                       **options)

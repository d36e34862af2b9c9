#!/usr/bin/env bash
# Llama-3.1-8B RIFT on one node of 8 GPUs with torchrun (slurm.sh runs it through srun):
#
#   bash examples/llama31_8b_single_node/torchrun.sh [key=value ...]
#
# Variables [default]:
#   NPROC_PER_NODE  GPUs (ranks): the config is planned for 8, another count is refused              [8]
#   NCCL and allocator variables: examples/launch_env.sh
# Arguments: config overrides (key=value, e.g. training.steps=10). The config's relative paths (ckpt/,
# data/, runs/) start at the repository root. torchrun --standalone: a local rendezvous on a free port.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=examples/launch_env.sh
source examples/launch_env.sh
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
rift_launch_check 8 1 "$NPROC_PER_NODE"
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" \
  -m rift_megatron.train --config examples/llama31_8b_single_node/config.yaml "$@"

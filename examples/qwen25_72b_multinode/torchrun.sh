#!/usr/bin/env bash
# Qwen2.5-72B RIFT on 8 nodes x 8 GPUs with torchrun, without Slurm: run this script on every node,
# with the same variables; torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT numbers the nodes.
# (slurm.sh runs it on each node of the job through srun.)
#
#   MASTER_ADDR=node001 bash examples/qwen25_72b_multinode/torchrun.sh [key=value ...]   # on each node
#
# Variables [default]:
#   NNODES          nodes in the job: the config is planned for 8 x 8 GPUs, another world is refused [8]
#   NPROC_PER_NODE  GPUs (ranks) per node                                                           [8]
#   MASTER_ADDR     the host of the rendezvous store (e.g. the first node), reachable from every node
#                                                                                          [required]
#   MASTER_PORT     its TCP port                                                                [29500]
#   RDZV_ID         the job's id, the same on every node                                [rift-qwen25-72b]
#   NCCL / InfiniBand and allocator variables: examples/launch_env.sh
# Arguments: config overrides (key=value, e.g. training.steps=10). The config's relative paths (ckpt/,
# data/, runs/) start at the repository root, which must be the same shared directory on every node.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=examples/launch_env.sh
source examples/launch_env.sh
NNODES="${NNODES:-8}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-rift-qwen25-72b}"
: "${MASTER_ADDR:?set MASTER_ADDR to a host every node reaches (the first node)}"
rift_launch_check 64 "$NNODES" "$NPROC_PER_NODE"
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "$RDZV_ID" \
  -m rift_megatron.train --config examples/qwen25_72b_multinode/config.yaml "$@"

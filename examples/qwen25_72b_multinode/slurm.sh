#!/usr/bin/env bash
# 4 nodes x 8 GPUs; one torchrun per node, rendezvous on the first node.
#SBATCH --job-name=rift-qwen25-72b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node 8 \
  --rdzv-backend c10d --rdzv-endpoint "${head_node}:29500" --rdzv-id "$SLURM_JOB_ID" \
  -m rift_megatron.train --config examples/qwen25_72b_multinode/config.yaml "$@"

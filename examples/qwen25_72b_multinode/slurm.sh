#!/usr/bin/env bash
# Qwen2.5-72B RIFT on 8 nodes x 8 GPUs under Slurm: one task per node runs this example's torchrun.sh,
# whose torchrun starts the node's 8 ranks; the c10d rendezvous runs on the job's first node.
#
#   sbatch examples/qwen25_72b_multinode/slurm.sh [key=value ...]          # from the repository root
#   sbatch --partition=P --account=A --time=T examples/qwen25_72b_multinode/slurm.sh   # site options
#
# --cpus-per-task: the cores of the node's one task, shared by its 8 ranks, their vLLM workers and
# verifier processes (algorithm.reward_workers each) and the data loading. Give it the node's cores
# (`sbatch --cpus-per-task=N` overrides the 96 below). srun is handed the same value: since Slurm
# 22.05 a step does not inherit --cpus-per-task from the job (it would get one core per task).
# NCCL / InfiniBand and allocator variables (exported before sbatch, they reach every node):
# examples/launch_env.sh. MASTER_PORT [29500] is the rendezvous port on the first node.
#SBATCH --job-name=rift-qwen25-72b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch from the repository root
# shellcheck source=examples/launch_env.sh
source examples/launch_env.sh
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # not head: SIGPIPE under pipefail
export MASTER_ADDR NNODES="$SLURM_NNODES" RDZV_ID="$SLURM_JOB_ID"
rift_srun examples/qwen25_72b_multinode/torchrun.sh "$@"

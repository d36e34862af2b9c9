#!/usr/bin/env bash
# Llama-3.1-8B RIFT on one node of 8 GPUs under Slurm: one task runs this example's torchrun.sh.
#
#   sbatch examples/llama31_8b_single_node/slurm.sh [key=value ...]          # from the repository root
#   sbatch --partition=P --account=A --time=T examples/llama31_8b_single_node/slurm.sh   # site options
#
# --cpus-per-task: the cores of the node's one task, shared by its 8 ranks, their vLLM workers and
# verifier processes (algorithm.reward_workers each) and the data loading. Give it the node's cores
# (`sbatch --cpus-per-task=N` overrides the 96 below). srun is handed the same value: since Slurm
# 22.05 a step does not inherit --cpus-per-task from the job (it would get one core per task).
# NCCL and allocator variables (exported before sbatch, they reach the job): examples/launch_env.sh.
#SBATCH --job-name=rift-llama31-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch from the repository root
# shellcheck source=examples/launch_env.sh
source examples/launch_env.sh
rift_srun examples/llama31_8b_single_node/torchrun.sh "$@"

# shellcheck shell=bash
# The launch environment of the GPU examples, sourced by their torchrun.sh (which their slurm.sh runs
# on every node through srun). It starts nothing. A variable the caller exported keeps its value:
#
#   NCCL_IB_HCA=mlx5_0,mlx5_3,mlx5_4,mlx5_5 NCCL_DEBUG=INFO sbatch examples/qwen25_72b_multinode/slurm.sh
#
# NCCL over InfiniBand / RoCE (unset or empty: NCCL's own choice, which uses every IB / RoCE device
# and interface it finds):
#   NCCL_IB_HCA         the HCAs for inter-node traffic: a prefix (mlx5), a list (mlx5_0,mlx5_1) or
#                       exact devices and ports (=mlx5_0:1,mlx5_1:1). Name the compute rails where the
#                       storage NICs are HCAs too (`ibstat` or `ibv_devinfo` lists them)      [unset]
#   NCCL_SOCKET_IFNAME  the interface of NCCL's bootstrap and socket fallback: eth0, ib0, or ^lo,docker
#                       (every interface but these)                                          [unset]
#   GLOO_SOCKET_IFNAME  the same for gloo (the trainer's CPU process groups: the rollout wait,
#                       checkpoint bookkeeping); one plain interface name              [unset: the
#                       address the host name resolves to]
#   NCCL_IB_GID_INDEX   RoCE only: the GID index of the RoCE v2 address (often 3); InfiniBand needs
#                       none                                                 [unset: NCCL picks it]
#   NCCL_DEBUG          WARN, or INFO to see the transport each connection uses (NET/IB, not
#                       NET/Socket, between nodes)                                             [WARN]
# PyTorch's CUDA allocator:
#   PYTORCH_CUDA_ALLOC_CONF  less fragmentation as micro-batches of different lengths (packing) come
#                       and go and the engine sleeps and wakes; vLLM 0.32 switches expandable segments
#                       off inside its sleep-mode pool and back after it (vllm/device_allocator/cumem.py)
#                                                                      [expandable_segments:True]
# Not set here: CUDA_DEVICE_MAX_CONNECTIONS, which the trainer sets itself before CUDA starts (1 with
# TP > 1: Megatron's ordering of TP communication; rift_megatron/models/performance.py), over any value.

export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
for _rift_name in NCCL_IB_HCA NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_GID_INDEX; do
  if [[ -z "${!_rift_name:-}" ]]; then
    unset "$_rift_name"  # empty means NCCL's / gloo's own choice, not an empty value
  fi
done
unset _rift_name

# rift_launch_check PLANNED_GPUS NODES GPUS_PER_NODE: refuse a world the config was not planned for
# (another data-parallel size changes every rank's memory: the old 72B example ran out of it at DP2).
rift_launch_check() {
  local planned="$1" nodes="$2" per_node="$3"
  if (( nodes * per_node != planned )); then
    echo "error: this example is planned for ${planned} GPUs, not ${nodes} x ${per_node}: run \`rift plan\` for" \
         "your cluster (the command is in the example's config.yaml header) and edit the config" >&2
    return 2
  fi
  echo "$(hostname): ${nodes} x ${per_node} GPUs; NCCL_IB_HCA=${NCCL_IB_HCA:-unset}" \
       "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-unset} NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-unset}" \
       "NCCL_DEBUG=${NCCL_DEBUG} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF}" >&2
}

# rift_srun LAUNCHER [ARGS...]: LAUNCHER once on every node of the Slurm job, with the job's cores (a
# step does not inherit --cpus-per-task from the job since Slurm 22.05); one failed node ends the step.
rift_srun() {
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 \
    bash "$@"
}

#!/usr/bin/env bash
# One process of a multi-node GPU run (any cluster, no scheduler needed): run it once on
# every node, each process driving all of its node's GPUs; they meet at the coordinator
# (process 0's host) through jax.distributed.
#
# Usage: launch/gpu_multinode.sh [--dry-run] [--coordinator HOST:PORT] [--num-processes N]
#          [--process-id I] --config CONFIG --workdir DIR [--config.KEY=VALUE ...]
#
#   --coordinator HOST:PORT   address of process 0, reachable from every node
#                             (default: $JAX_COORDINATOR_ADDRESS)
#   --num-processes N         number of processes, one per node (default: $JAX_NUM_PROCESSES)
#   --process-id I            this process, 0..N-1 (default: $JAX_PROCESS_ID, else
#                             $SLURM_PROCID under srun)
#   --config, --workdir, --config.KEY=VALUE   passed to `diffusion-jax train` as they are;
#                             DIR must be the same shared directory (NFS, Lustre) on all nodes
#   --dry-run                 print the command instead of running it (or DRY_RUN=1)
#   DIFFUSION_JAX_PYTHON=PATH run `PATH -m diffusion_jax.cli` instead of `diffusion-jax`
#
# The script execs the trainer, so a SIGTERM sent to it reaches the trainer, which writes
# a checkpoint and exits with code 3; rerunning resumes from the newest checkpoint.
#
# Example (two nodes, node0 being the coordinator):
#   node0$ launch/gpu_multinode.sh --coordinator node0:12345 --num-processes 2 \
#            --process-id 0 --config configs/sd15.py --workdir /shared/runs/sd15
#   node1$ launch/gpu_multinode.sh --coordinator node0:12345 --num-processes 2 \
#            --process-id 1 --config configs/sd15.py --workdir /shared/runs/sd15

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

coordinator=${JAX_COORDINATOR_ADDRESS:-}
num_processes=${JAX_NUM_PROCESSES:-}
process_id=${JAX_PROCESS_ID:-${SLURM_PROCID:-}}
while (($#)); do
  take_train_option "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case $1 in
    --coordinator | --num-processes | --process-id)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --coordinator) coordinator=$2 ;;
        --num-processes) num_processes=$2 ;;
        --process-id) process_id=$2 ;;
      esac
      shift 2 ;;
    --dry-run) export DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require_train_options
[[ $coordinator =~ ^[^:]+:[0-9]+$ ]] \
  || die "--coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS) is required, got '$coordinator'"
[[ $num_processes =~ ^[1-9][0-9]*$ ]] \
  || die "--num-processes N (or JAX_NUM_PROCESSES) must be a positive integer, got '$num_processes'"
if [[ ! $process_id =~ ^[0-9]+$ ]] || ((10#$process_id >= num_processes)); then
  die "--process-id (or JAX_PROCESS_ID) must be in 0..$((num_processes - 1)), got '$process_id'"
fi
train_command

run_exec env "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$num_processes" \
  "JAX_PROCESS_ID=$process_id" "${TRAIN[@]}"

#!/usr/bin/env bash
# Train on one machine with several GPUs: one process that drives every local GPU
# (JAX single-process multi-device; the batch and fsdp shards spread over all of them).
#
# Usage: launch/gpu_node.sh [--dry-run] [--gpus LIST] --config CONFIG --workdir DIR
#                           [--config.KEY=VALUE ...]
#
#   --config, --workdir, --config.KEY=VALUE   passed to `diffusion-jax train` as they are
#   --gpus LIST      CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: every GPU)
#   --dry-run        print the command instead of running it (or DRY_RUN=1)
#   DIFFUSION_JAX_PYTHON=PATH   run `PATH -m diffusion_jax.cli` instead of `diffusion-jax`
#
# JAX_NUM_PROCESSES=1 keeps the run single-process even inside a multi-task SLURM
# allocation. Rerunning the same command resumes from the newest checkpoint in DIR; exit
# code 3 means it stopped on SIGTERM after writing a checkpoint.
#
# Example:
#   launch/gpu_node.sh --config configs/sd15.py --workdir /data/runs/sd15 \
#     --config.data.batch_size=64 --config.dtype=bfloat16

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

gpus=""
while (($#)); do
  take_train_option "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case $1 in
    --gpus) (($# >= 2)) || die "--gpus needs a value"; gpus=$2; shift 2 ;;
    --dry-run) export DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require_train_options
train_command

env_vars=(JAX_NUM_PROCESSES=1)
[[ -z $gpus ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
run_exec env "${env_vars[@]}" "${TRAIN[@]}"

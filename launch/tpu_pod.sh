#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod): create it, install the project on
# every worker, run `diffusion-jax train` on all workers at once with the workdir and the
# XLA compilation cache on GCS, read the workers' logs, stop cleanly, delete.
#
# Usage: launch/tpu_pod.sh [--dry-run] COMMAND --name NAME --zone ZONE [options]
#
# Commands:
#   create   create the TPU VM (reused when it exists already)
#   install  on every worker: fetch --repo at --ref into ~/diffusion-jax (git) and
#            pip install -e ".[tpu]" there
#   train    on every worker: start `diffusion-jax train` in the background
#            (launch/tpu_worker.sh; log ~/diffusion-jax-logs/train.log on each worker)
#   up       create, install, train (after the preflight, see --skip-preflight)
#   preflight  only the local check of the train options that `up` and `train` run first
#   logs     tail of the workers' logs; with --out DIR, one file per worker (DIR/N.log)
#   status   worker 0's trainer: `running`, its exit code, or `none`
#   stop     SIGTERM to the trainers: they write a checkpoint and exit with code 3;
#            `train` again resumes from it
#   delete   delete the TPU VM
#
# Options:
#   --name NAME, --zone ZONE   the TPU VM (required); --project PROJECT (default: gcloud's)
#   --accelerator-type TYPE    create: e.g. v4-32, v5litepod-16, v5p-64 (default v4-8)
#   --version VERSION          create: TPU VM runtime (default tpu-ubuntu2204-base)
#   --repo URL --ref REF       install: the git repository the workers fetch (default
#                              $DIFFUSION_JAX_REPO) and its branch, tag or commit (default
#                              main); push what you want to run first
#   --config CONFIG --workdir gs://BUCKET/PATH [--config.KEY=VALUE ...]
#                              train: as `diffusion-jax train` takes them; CONFIG is a path
#                              in the repository. The workers share no disk, so the workdir
#                              (checkpoints, resume) must be on GCS.
#   --cache-dir gs://...       train: persistent XLA compilation cache
#                              (DIFFUSION_JAX_CACHE_DIR; default gs://BUCKET/xla-cache)
#   --worker W                 logs: all (default) or one worker number
#   --lines N, --follow, --out DIR   logs: lines per worker (100), follow, save per worker
#   --skip-preflight           up, train: skip the local `diffusion-jax train --dry-run`
#                              that first checks the config and compiles the train step
#                              for the slice's device count (from --accelerator-type) on
#                              fake CPU devices; by default nothing is created when it fails
#   --dry-run                  print the commands instead of running them (or DRY_RUN=1)
#
# Example:
#   launch/tpu_pod.sh up --name sd-pod --zone us-central2-b --accelerator-type v4-32 \
#     --repo https://github.com/you/diffusion-jax --config configs/sd15_finetune.py \
#     --workdir gs://your-bucket/runs/sd15 --config.init_from=gs://your-bucket/ckpt/sd15 \
#     --config.data.path=/gcs/your-bucket/latents/sd15-512
#   launch/tpu_pod.sh logs --name sd-pod --zone us-central2-b --worker 0 --follow
#   launch/tpu_pod.sh stop --name sd-pod --zone us-central2-b

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

REMOTE_DIR=diffusion-jax  # relative to the workers' home directory, where ssh starts
WORKER_SCRIPT=$REMOTE_DIR/launch/tpu_worker.sh

name="" zone="" project="" accelerator_type=v4-8 version=tpu-ubuntu2204-base
repo=${DIFFUSION_JAX_REPO:-} ref=main cache_dir="" worker=all lines=100 follow=0 out=""

parse_args() {
  while (($#)); do
    take_train_option "$@"
    if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
    case $1 in
      --follow) follow=1; shift; continue ;;
      --dry-run) export DRY_RUN=1; shift; continue ;;
      -h | --help) usage; exit 0 ;;
      --name | --zone | --project | --accelerator-type | --version | --repo | --ref | \
        --cache-dir | --worker | --lines | --out)
        (($# >= 2)) || die "$1 needs a value" ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
    case $1 in
      --name) name=$2 ;;
      --zone) zone=$2 ;;
      --project) project=$2 ;;
      --accelerator-type) accelerator_type=$2 ;;
      --version) version=$2 ;;
      --repo) repo=$2 ;;
      --ref) ref=$2 ;;
      --cache-dir) cache_dir=$2 ;;
      --worker) worker=$2 ;;
      --lines) lines=$2 ;;
      --out) out=$2 ;;
    esac
    shift 2
  done
  require_name_and_zone
}

gcloud_tpu() { gcloud_tpus tpu-vm "$@"; }

on_workers() {  # on_workers WORKERS COMMAND_WORD...: run a command on the workers over ssh
  local workers=$1
  shift
  gcloud_tpu ssh --worker="$workers" --command="$(quote_command "$@")"
}

create() {
  if dry_run; then
    gcloud_tpu describe --format='value(state)'
  elif gcloud_tpu describe --format='value(state)' >/dev/null 2>&1; then
    note "TPU VM $name exists in $zone: reusing it"
    return
  fi
  gcloud_tpu create --accelerator-type="$accelerator_type" --version="$version"
}

require_repo() {
  [[ -n $repo ]] || die "--repo URL (or DIFFUSION_JAX_REPO) is required to install"
}

require_gcs_workdir() {
  require_train_options
  [[ $WORKDIR =~ ^gs://[^/]+ ]] \
    || die "--workdir must be on GCS (gs://BUCKET/PATH): the workers share no disk, got '$WORKDIR'"
}

install() {
  require_repo
  # Fetching one ref into a fresh or existing checkout works the same for a branch, a tag
  # or a commit, and leaves no stale files of an earlier install behind.
  local steps=(
    "$(quote_command mkdir -p "$REMOTE_DIR")"
    "$(quote_command cd "$REMOTE_DIR")"
    "$(quote_command git init -q)"
    "$(quote_command git fetch -q --depth=1 "$repo" "$ref")"
    "$(quote_command git checkout -q --force FETCH_HEAD)"
    "$(quote_command python3 -m pip install -q -e '.[tpu]')"
  )
  local joined
  joined=$(printf ' && %s' "${steps[@]}")
  gcloud_tpu ssh --worker=all --command="${joined:4}"
}

train() {
  require_gcs_workdir
  local bucket=${WORKDIR#gs://}
  bucket=${bucket%%/*}
  on_workers all bash "$WORKER_SCRIPT" start --cache-dir "${cache_dir:-gs://$bucket/xla-cache}" \
    --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}"
  dry_run || note "training on every worker of $name; follow it with: $0 logs --name $name --zone $zone --worker 0 --follow"
}

logs() {
  local args=(bash "$WORKER_SCRIPT" logs --lines "$lines")
  ((follow == 0)) || args+=(--follow)
  if [[ -n $out ]]; then
    run mkdir -p "$out"
    gcloud_tpu ssh --worker="$worker" --command="$(quote_command "${args[@]}")" \
      --output-directory="$out"
  else
    on_workers "$worker" "${args[@]}"
  fi
}

main() {
  while (($#)) && [[ $1 == --dry-run ]]; do export DRY_RUN=1; shift; done
  (($#)) || { usage >&2; exit 1; }
  local command=$1
  shift
  [[ $command != -h && $command != --help ]] || { usage; exit 0; }
  parse_args "$@"
  local devices
  devices=$(tpu_devices "$accelerator_type")
  case $command in
    create) create ;;
    install) install ;;
    preflight) require_gcs_workdir; preflight "$devices" ;;
    train) require_gcs_workdir; preflight "$devices"; train ;;
    up) require_repo; require_gcs_workdir; preflight "$devices"; create; install; train ;;
    logs) logs ;;
    status) on_workers 0 bash "$WORKER_SCRIPT" status ;;
    stop) on_workers all bash "$WORKER_SCRIPT" stop ;;
    delete) gcloud_tpu delete --quiet ;;
    *) die "unknown command '$command' (see --help)" ;;
  esac
}

main "$@"

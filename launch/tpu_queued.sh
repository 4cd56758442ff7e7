#!/usr/bin/env bash
# Train on Spot TPUs through a queued resource, surviving preemptions: `supervise` waits
# until the slice is granted, installs the project, starts training (launch/tpu_pod.sh
# install + train), and polls. When the slice is preempted it deletes the suspended
# queued resource, requests a new one, reinstalls and reruns train, which resumes from
# the newest checkpoint in the GCS workdir. It returns when training exits 0.
#
# Usage: launch/tpu_queued.sh [--dry-run] COMMAND --name NAME --zone ZONE [options]
#
# Commands:
#   create     request the Spot slice (queued resource NAME, TPU VM NAME)
#   status     the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...,
#              or absent)
#   supervise  create when absent, then install/train/resume until training exits 0
#   delete     delete the queued resource and its TPU VM
#   For logs and a clean stop use launch/tpu_pod.sh logs|stop with the same --name/--zone
#   (stop the supervisor first, or it resumes the run).
#
# Options: those of launch/tpu_pod.sh (--project, --accelerator-type, --version, --repo,
# --ref, --config, --workdir gs://..., --cache-dir, --config.KEY=VALUE ...,
# --skip-preflight), plus
#   --poll-seconds S   seconds between state checks (default 60)
#   --max-restarts N   give up after N new slices or reruns (default 20)
#   --dry-run          print the commands of one pass instead of running them (or DRY_RUN=1)
#
# Exit code 3 from training (SIGTERM: a preemption notice or maintenance) or a slice that
# disappears means "resume"; any other failure on a live slice stops the supervisor.
#
# Example:
#   launch/tpu_queued.sh supervise --name sd-spot --zone us-central2-b \
#     --accelerator-type v4-32 --repo https://github.com/you/diffusion-jax \
#     --config configs/sd15_finetune.py --workdir gs://your-bucket/runs/sd15 \
#     --config.init_from=gs://your-bucket/ckpt/sd15 \
#     --config.data.path=/gcs/your-bucket/latents/sd15-512

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

name="" zone="" project="" accelerator_type=v4-8 version=tpu-ubuntu2204-base
poll=60 max_restarts=20
pod_args=()  # everything but this script's own options, for launch/tpu_pod.sh

parse_args() {
  while (($#)); do
    case $1 in
      --dry-run) export DRY_RUN=1; shift; continue ;;
      -h | --help) usage; exit 0 ;;
      --poll-seconds | --max-restarts)
        (($# >= 2)) || die "$1 needs a value"
        [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
        if [[ $1 == --poll-seconds ]]; then poll=$2; else max_restarts=$2; fi
        shift 2
        continue ;;
      --name | --zone | --project | --accelerator-type | --version)
        (($# >= 2)) || die "$1 needs a value"
        case $1 in
          --name) name=$2 ;;
          --zone) zone=$2 ;;
          --project) project=$2 ;;
          --accelerator-type) accelerator_type=$2 ;;
          --version) version=$2 ;;
        esac ;;
    esac
    pod_args+=("$1")
    shift
  done
  require_name_and_zone
}

queued() { gcloud_tpus queued-resources "$@"; }

state() {  # the queued resource's state; nothing when it does not exist
  queued describe --format='value(state.state)' 2>/dev/null || true
}

create() {
  queued create --node-id="$name" --accelerator-type="$accelerator_type" \
    --runtime-version="$version" --spot
}

pod() {  # launch/tpu_pod.sh COMMAND with this run's options
  local flags=()
  dry_run && flags=(--dry-run)
  bash "$here/tpu_pod.sh" "$1" "${flags[@]}" "${pod_args[@]}"
}

restarts=0

count_restart() {
  restarts=$((restarts + 1))
  ((restarts <= max_restarts)) || die "gave up after $max_restarts restarts (--max-restarts)"
}

wait_until_active() {
  if dry_run; then
    state
    create
    return
  fi
  local current
  while true; do
    current=$(state)
    case $current in
      ACTIVE) return ;;
      "") count_restart; note "requesting a Spot slice"; create ;;
      SUSPENDED | FAILED) note "queued resource is $current: deleting it"; queued delete --force --quiet ;;
      *) note "queued resource is $current: waiting" ;;
    esac
    sleep "$poll"
  done
}

wait_for_trainer() {  # prints the trainer's exit code, or `preempted`, or `lost`
  local current code
  while true; do
    sleep "$poll"
    current=$(state)
    if [[ $current != ACTIVE ]]; then
      echo preempted
      return
    fi
    code=$(pod status 2>/dev/null | tail -n 1) || continue  # ssh can fail for a moment
    case $code in
      running) ;;
      none) echo lost; return ;;  # the VM restarted under us: its trainer is gone
      *) echo "$code"; return ;;
    esac
  done
}

supervise() {
  # Bad options, then a config that fails the preflight, stop here, before a slice is paid for.
  DRY_RUN=1 pod up >/dev/null
  pod preflight
  pod_args+=(--skip-preflight)  # checked once, not again at every restart
  local outcome
  while true; do
    wait_until_active
    if dry_run; then
      pod install
      pod train
      pod status
      return
    fi
    if [[ $(pod status 2>/dev/null | tail -n 1) == running ]]; then
      note "a trainer is running on $name already: watching it"
    elif ! { pod install && pod train; }; then
      note "install or train failed (a preempted slice, or see the messages above)"
      count_restart
      continue
    fi
    outcome=$(wait_for_trainer)
    case $outcome in
      0) note "training finished"; return ;;
      3 | preempted | lost) note "training interrupted ($outcome): resuming from the last checkpoint" ;;
      *) die "training failed with exit code $outcome on worker 0 of a live slice; see" \
           "launch/tpu_pod.sh logs --name $name --zone $zone" ;;
    esac
    [[ $outcome == preempted ]] || count_restart  # new slices are counted when requested
  done
}

main() {
  while (($#)) && [[ $1 == --dry-run ]]; do export DRY_RUN=1; shift; done
  (($#)) || { usage >&2; exit 1; }
  local command=$1
  shift
  [[ $command != -h && $command != --help ]] || { usage; exit 0; }
  parse_args "$@"
  case $command in
    create) create ;;
    status) current=$(state); echo "${current:-absent}" ;;
    supervise) supervise ;;
    delete) queued delete --force --quiet ;;
    *) die "unknown command '$command' (see --help)" ;;
  esac
}

main "$@"

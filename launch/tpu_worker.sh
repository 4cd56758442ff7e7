#!/usr/bin/env bash
# Runs ON each Cloud TPU VM worker (launch/tpu_pod.sh calls it over `gcloud ... ssh
# --worker=all`): starts `diffusion-jax train` detached from the ssh session, stops it
# with SIGTERM, reports its state and shows its log. One trainer per worker.
#
# Usage: bash diffusion-jax/launch/tpu_worker.sh [--dry-run] COMMAND [options]
#   start --cache-dir DIR --config CONFIG --workdir gs://... [--config.KEY=VALUE ...]
#           start the trainer in the background (nohup), log to LOGS/train.log
#   run --num-workers N ...same options as start...
#           the trainer in the foreground (what start runs): records its pid in
#           LOGS/train.pid and, when it ends, its exit code in LOGS/exit-code
#   stop    SIGTERM to the trainer: it writes a checkpoint and exits with code 3
#   status  prints `running`, the trainer's exit code, or `none` (never started here)
#   logs [--lines N] [--follow]   tail of LOGS/train.log (default 100 lines)
#
# LOGS is $DIFFUSION_JAX_LOG_DIR, default ~/diffusion-jax-logs. The worker count
# (JAX_NUM_PROCESSES; jax.distributed finds the rest itself) comes from the TPU VM
# metadata; --dry-run (or DRY_RUN=1) prints the lookup and shows the count as <N workers>.

set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes
log_dir=${DIFFUSION_JAX_LOG_DIR:-$HOME/diffusion-jax-logs}
pid_file=$log_dir/train.pid
exit_file=$log_dir/exit-code

trainer_pid() {  # the pid of a live trainer started here, or nothing
  local pid
  [[ -f $pid_file ]] || return 0
  pid=$(<"$pid_file")
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    printf '%s\n' "$pid"
  fi
}

parse_train_options() {  # start/run options into CONFIG, WORKDIR, OVERRIDES, cache_dir, num_workers
  cache_dir="" num_workers=""
  while (($#)); do
    take_train_option "$@"
    if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
    case $1 in
      --cache-dir | --num-workers)
        (($# >= 2)) || die "$1 needs a value"
        if [[ $1 == --cache-dir ]]; then cache_dir=$2; else num_workers=$2; fi
        shift 2 ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
  done
  require_train_options
  [[ -n $cache_dir ]] || die "--cache-dir DIR is required"
}

start() {
  parse_train_options "$@"
  local pid lookup=(curl -sf -H 'Metadata-Flavor: Google' "$METADATA/worker-network-endpoints")
  pid=$(trainer_pid)
  [[ -z $pid ]] || die "a trainer is already running here (pid $pid); stop it first"
  if dry_run; then
    quote_command "${lookup[@]}"
    num_workers="<N workers>"
  else
    # One comma-separated entry per worker of the slice.
    num_workers=$("${lookup[@]}" | tr ',' '\n' | grep -c .) \
      || die "no TPU worker list in the VM metadata: is this a Cloud TPU VM?"
    mkdir -p "$log_dir"
    rm -f "$exit_file" "$pid_file"
  fi
  local runner=(nohup bash "$here/tpu_worker.sh" run --num-workers "$num_workers"
                --cache-dir "$cache_dir" --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}")
  # Detached: all three streams away from the ssh channel, so ssh returns and a dropped
  # connection does not stop training.
  if dry_run; then
    printf '%s > %s 2>&1 < /dev/null &\n' "$(quote_command "${runner[@]}")" "$(quote "$log_dir/train.log")"
  else
    "${runner[@]}" >"$log_dir/train.log" 2>&1 </dev/null &
    note "trainer started on $(hostname) ($num_workers workers), log $log_dir/train.log"
  fi
}

run_trainer() {
  parse_train_options "$@"
  [[ $num_workers =~ ^[1-9][0-9]*$ ]] || die "--num-workers N must be a positive integer"
  train_command
  local env_vars=("PATH=$HOME/.local/bin:$PATH" "JAX_NUM_PROCESSES=$num_workers"
                  "DIFFUSION_JAX_CACHE_DIR=$cache_dir")
  cd "$here/.."  # config paths are relative to the repository
  if dry_run; then
    quote_command env "${env_vars[@]}" "${TRAIN[@]}"
    return
  fi
  mkdir -p "$log_dir"
  env "${env_vars[@]}" "${TRAIN[@]}" &
  local pid=$! status=0
  printf '%s\n' "$pid" >"$pid_file"
  trap 'kill -TERM "$pid"' TERM  # a SIGTERM meant for this runner goes to the trainer
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do  # the trap interrupted `wait`: wait for the trainer
    status=0
    wait "$pid" || status=$?
  done
  printf '%s\n' "$status" >"$exit_file"
  note "trainer exited with code $status"
  exit "$status"
}

stop() {
  (($# == 0)) || die "stop takes no arguments"
  local pid
  pid=$(trainer_pid)
  if [[ -z $pid ]]; then
    note "no trainer running on $(hostname)"
    return
  fi
  run kill -TERM "$pid"
}

status() {
  (($# == 0)) || die "status takes no arguments"
  if [[ -n $(trainer_pid) ]]; then
    echo running
  elif [[ -f $exit_file ]]; then
    cat "$exit_file"
  else
    echo none
  fi
}

logs() {
  local lines=100 follow=()
  while (($#)); do
    case $1 in
      --lines) (($# >= 2)) || die "--lines needs a value"; lines=$2; shift 2 ;;
      --follow) follow=(-f); shift ;;
      *) die "unknown argument '$1' (see --help)" ;;
    esac
  done
  dry_run || printf '==> %s <==\n' "$(hostname)"  # which worker, when gathered from all
  run tail -n "$lines" "${follow[@]}" "$log_dir/train.log"
}

while (($#)) && [[ $1 == --dry-run ]]; do export DRY_RUN=1; shift; done
(($#)) || { usage >&2; exit 1; }
command=$1
shift
case $command in
  start) start "$@" ;;
  run) run_trainer "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  logs) logs "$@" ;;
  -h | --help) usage ;;
  *) die "unknown command '$command' (see --help)" ;;
esac

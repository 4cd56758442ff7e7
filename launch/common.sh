# Helpers shared by the launch/ scripts (sourced, not run): dry-run printing with shell
# quoting, errors, --help from a script's header comment, and the train arguments every
# script forwards to `diffusion-jax train` (--config, --workdir, --config.KEY=VALUE).
# shellcheck shell=bash
# shellcheck disable=SC2034  # CONSUMED, TRAIN, ...: set here, read by the sourcing script

# DRY_RUN=1 in the environment or --dry-run: print each command instead of running it.
DRY_RUN="${DRY_RUN:-0}"

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 1
}

note() {  # progress messages go to stderr, so stdout holds only commands in a dry run
  printf '%s: %s\n' "${0##*/}" "$*" >&2
}

usage() {  # the header comment of the running script: from line 2 to the first blank line
  sed -n '2,/^$/{/^#!/d;s/^# \{0,1\}//p;}' "$0"
}

dry_run() {
  [[ $DRY_RUN == 1 ]]
}

quote() {  # one word for a POSIX shell: bare when safe, else single-quoted (as shlex.quote)
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\"\'\"\'}"
  fi
}

quote_command() {  # the words of a command as one line a shell reads back as those words
  local words=() word
  for word in "$@"; do
    words+=("$(quote "$word")")
  done
  printf '%s\n' "${words[*]}"
}

run() {  # run a command, or print it in a dry run
  if dry_run; then
    quote_command "$@"
  else
    "$@"
  fi
}

run_exec() {  # replace this shell by a command (signals reach it directly), or print it
  if dry_run; then
    quote_command "$@"
  else
    exec "$@"
  fi
}

# ------------------------------------------------------------------ train arguments

CONFIG=""
WORKDIR=""
OVERRIDES=()
CONSUMED=0
SKIP_PREFLIGHT=0

take_train_option() {  # consumes --config/--workdir/--config.KEY[=]VALUE; CONSUMED = words used
  CONSUMED=0
  case $1 in
    --config | --workdir)
      (($# >= 2)) || die "$1 needs a value"
      if [[ $1 == --config ]]; then CONFIG=$2; else WORKDIR=$2; fi
      CONSUMED=2 ;;
    --config=*) CONFIG=${1#*=}; CONSUMED=1 ;;
    --workdir=*) WORKDIR=${1#*=}; CONSUMED=1 ;;
    --skip-preflight) SKIP_PREFLIGHT=1; CONSUMED=1 ;;
    --config.*=*) OVERRIDES+=("$1"); CONSUMED=1 ;;
    --config.*)
      (($# >= 2)) || die "$1 needs a value"
      OVERRIDES+=("$1=$2")  # one word from here on: `--config.KEY=VALUE`
      CONSUMED=2 ;;
  esac
}

require_train_options() {
  [[ -n $CONFIG ]] || die "--config CONFIG is required (a configs/*.py file)"
  [[ -n $WORKDIR ]] || die "--workdir DIR is required"
}

train_command() {  # sets TRAIN to `diffusion-jax train ...` with the parsed train arguments
  local program=(diffusion-jax)
  # DIFFUSION_JAX_PYTHON: run through this interpreter (a venv not on PATH, tests).
  if [[ -n ${DIFFUSION_JAX_PYTHON:-} ]]; then
    program=("$DIFFUSION_JAX_PYTHON" -m diffusion_jax.cli)
  fi
  TRAIN=("${program[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "${OVERRIDES[@]}")
}

preflight() {  # preflight DEVICES: `diffusion-jax train --dry-run` here, compiling for
  # DEVICES fake CPU devices, so a bad config stops before a slice or a job is paid for
  local devices=$1
  if ((SKIP_PREFLIGHT)); then
    note "preflight skipped (--skip-preflight)"
    return
  fi
  train_command
  local cmd=("${TRAIN[@]}" --dry-run --devices "$devices")
  if dry_run; then
    quote_command "${cmd[@]}"
    return
  fi
  command -v "${cmd[0]}" >/dev/null \
    || die "the preflight runs ${cmd[0]} on this machine: pip install -e . here (or set DIFFUSION_JAX_PYTHON), or pass --skip-preflight"
  note "preflight: checking the config and compiling the train step for $devices devices"
  "${cmd[@]}" >&2 || die "the preflight failed (see above): nothing was created or started"
}

tpu_devices() {  # the JAX devices of a TPU accelerator type: v2/v3 name TensorCores (one device
  # each), v4/v5p TensorCores (two per chip, one device), v5e/v6e chips
  local type=$1
  local count=${type##*-}
  [[ $count =~ ^[0-9]+$ && $type == *-* ]] \
    || die "--accelerator-type $type: expected a name like v4-32, v5p-64 or v5litepod-16"
  case $type in
    v2-* | v3-* | v5litepod-* | v5e-* | v6e-*) echo "$count" ;;
    v4-* | v5p-*) echo $((count / 2)) ;;
    *) die "--accelerator-type $type: unknown TPU generation (v2, v3, v4, v5p, v5litepod, v6e)" ;;
  esac
}

# The scripts that use these set NAME, ZONE and PROJECT from their own options.
# shellcheck disable=SC2154
gcloud_tpus() {  # gcloud compute tpus GROUP VERB NAME --zone=... [--project=...] ARGS...
  local group=$1 verb=$2
  shift 2
  local cmd=(gcloud compute tpus "$group" "$verb" "$name" --zone="$zone")
  [[ -z $project ]] || cmd+=(--project="$project")
  run "${cmd[@]}" "$@"
}

require_name_and_zone() {
  [[ -n $name ]] || die "--name NAME is required"
  [[ -n $zone ]] || die "--zone ZONE is required"
}

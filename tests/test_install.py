"""A non-editable install: a wheel built from the repository, installed into a new venv, runs
`diffusion-jax train --dry-run` with a bundled config away from any checkout.

The venv sees this machine's site-packages for the dependencies (jax, flax, ... are large and
installing them is not what is tested); the check below makes sure that the diffusion_jax
that runs is the wheel's, not the editable checkout's.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_a_wheel_in_a_new_venv_dry_runs_a_bundled_config(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "wheels"), str(REPO)])
    [wheel] = (tmp_path / "wheels").glob("diffusion_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {f"diffusion_jax/configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
    assert bundled <= names and "diffusion_jax/assets/bpe_simple_vocab_16e6.txt.gz" in names
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    elsewhere = tmp_path / "elsewhere"  # no configs/ folder here
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", DIFFUSION_JAX_CACHE_DIR=str(tmp_path / "xla"))
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import diffusion_jax.configs as c, diffusion_jax.config_files as f; "
                  "print(c.__file__); print(f.resolve('sd15_finetune')[0])"],
                 cwd=elsewhere, env=env).stdout.split()
    assert all(line.startswith(str(venv)) for line in where), where
    # A path from the README that does not exist here falls back to the bundled file.
    result = _run([str(venv / "bin" / "diffusion-jax"), "train", "--config", "configs/tiny_train.py",
                   "--workdir", "w", "--dry-run", "--no-compile"], cwd=elsewhere, env=env)
    assert "using the bundled config tiny_train" in result.stderr
    assert "preflight: the config is valid" in result.stdout
    assert "diffusion steps 7..14, global batch 8" in result.stdout
    assert not (elsewhere / "w").exists()

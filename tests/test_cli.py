"""The `diffusion-jax` command line: help, the params subcommand, one-line errors."""

import os
import subprocess
import sys

import pytest

from diffusion_jax import cli, config_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15_CONFIG = os.path.join(REPO_ROOT, "configs", "sd15.py")
SAMPLE = ["sample", "--checkpoint", "no/such/ckpt", "--prompt", "x", "--out", "x.png"]


@pytest.mark.parametrize("argv, needles", [
    ([], ["convert", "export", "params"]),
    (["convert"], ["--from {diffusers,single-file}", "--out", "--config", "--ema",
                   "configs/sd21_base.py", "v-prediction"]),
    (["export"], ["--checkpoint", "--to {diffusers,peft,kohya}", "--out", "--step", "--no-ema",
                  "default: the EMA params", "training workdir", "step folder"]),
    (["sample"], ["--no-ema", "default: the EMA weights", "--columns", "DIR/grid.png",
                  "--strength", "0 runs no step and returns the init image exactly",
                  "training workdir", "A1111"]),
    (["params"], ["--config"]),
])
def test_help(capsys, argv, needles):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in needles:
        assert needle in out, needle


def test_params_prints_the_sd15_counts(capsys):
    assert cli.main(["params", "--config", SD15_CONFIG]) == 0
    lines = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert lines == {"unet": "859,520,964", "vae": "83,653,863", "text_encoder": "123,060,480",
                     "total": "1,066,235,307"}


def test_config_files_import_each_other_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relies on the working directory
    config = config_files.load(os.path.join(REPO_ROOT, "configs", "sd21_base.py"))
    assert config.schedule.prediction_type == "epsilon"
    assert config.text_encoder.num_hidden_layers == 23


@pytest.mark.parametrize("argv, needles", [
    (["params", "--config", "no/such/config.py"], ["config no/such/config.py: no such file, and not a bundled config name"]),
    (["convert", "--from", "diffusers", "x", "--out", "y", "--config", SD15_CONFIG],
     ["--config, --ema and --base apply to --from single-file only"]),
    (["convert", "--from", "single-file", "no/such/file.safetensors", "--out", "y"],
     ["weights file no/such/file.safetensors does not exist"]),
    # Sampling options are checked before the (here missing) checkpoint is opened.
    (SAMPLE + ["--guidance-rescale", "2"], ["--guidance-rescale=2.0: must be in [0, 1]"]),
    (SAMPLE + ["--steps", "0"], ["--steps=0: must be a positive integer"]),
    (SAMPLE + ["--num-images", "0"], ["--num-images=0: must be >= 1"]),
    (SAMPLE + ["--eta", "-0.5", "--sampler", "ddim"], ["--eta=-0.5:", "must be >= 0"]),
    (SAMPLE + ["--init-image", "x.png", "--strength", "1.5"],
     ["--strength=1.5: must be in [0, 1]"]),
    (SAMPLE + ["--init-image", "x.png", "--strength", "-0.1"], ["--strength=-0.1: must be in"]),
    (SAMPLE + ["--columns", "0"], ["--columns 0: must be >= 1"]),
    (SAMPLE[:-1] + ["missing_dir/x.png"], ["--out missing_dir/x.png: directory missing_dir does "
                                          "not exist"]),
    (SAMPLE[:-1] + ["x.jpg"], ["--out x.jpg: the output must end in .png or .npy, or be a folder"]),
    (["fid", "--checkpoint", "no/such/ckpt", "--prompt", "x", "--save-stats", "s.npz",
      "--steps", "0"], ["--steps=0: must be a positive integer"]),
])
def test_bad_input_is_one_line_on_stderr(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("diffusion-jax: error: ")
    for needle in needles:
        assert needle in err
    assert os.listdir(tmp_path) == []


def test_config_without_models_is_an_error(capsys, tmp_path):
    config = tmp_path / "other.py"
    config.write_text("import ml_collections\n\ndef get_config():\n"
                      "    return ml_collections.ConfigDict({'seed': 0})\n")
    assert cli.main(["params", "--config", str(config)]) == 1
    assert "has none of the sections" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--from", "onnx", "x", "--out", "y"])
    assert info.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_the_installed_entry_point_exits_1_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from diffusion_jax.cli import main; sys.exit(main())",
         "export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"diffusion-jax: error: {tmp_path} is not a diffusion_jax checkpoint: it holds no "
        "checkpoint step directories; create one with `diffusion-jax convert --from "
        "diffusers|single-file SRC --out DIR` or by training")
    assert not (tmp_path / "out").exists()

"""ControlNet training (configs/tiny_controlnet_train.py, the demo's recipe on the tiny model):
the ControlNet starts from the base U-Net and is all the optimizer changes (the base params
bitwise as init_from gave them), the loss is finite, a run killed at a checkpoint resumes to
the same params bitwise, and the ControlNet checkpoint it writes is what `sample
--controlnet` and `export` take."""

import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint, system
from diffusion_jax.config_files import load as load_config_file
from diffusion_jax.training import trainer
from test_training import REPO, _env, _train_command

pytest.importorskip("cv2", reason="the Canny condition needs opencv-python-headless")
pytestmark = pytest.mark.xdist_group("controlnet_training")

TINY_CONTROLNET = REPO / "configs" / "tiny_controlnet_train.py"
TINY_BASE = REPO / "configs" / "tiny_train.py"
BASE_TOWERS = ("unet", "vae", "text_encoder")


def base_checkpoint(directory) -> None:
    """A tiny base model checkpoint (random weights, a latent scaling that is not 1) as
    init_from: training it first would add nothing these tests look at."""
    config = trainer.model_config(load_config_file(TINY_BASE))
    config["vae"]["scaling_factor"] = 0.5
    params = checkpoint.initial_params(config, seed=3)
    checkpoint.create(directory, params, config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    base_checkpoint(root / "base")
    workdir = root / "run"
    init = f"--config.init_from={root / 'base'}"
    result = subprocess.run(_train_command(workdir, init, config=TINY_CONTROLNET),
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return root, workdir, init


def test_only_the_controlnet_trains_from_the_base_unet(runs):
    root, workdir, _ = runs
    base, _ = checkpoint.load(root / "base", items=list(BASE_TOWERS))
    items, config = checkpoint.load(workdir / "checkpoints", items=[*BASE_TOWERS, "controlnet"])
    for name in BASE_TOWERS:
        jax.tree.map(np.testing.assert_array_equal, items[name], base[name])
    assert config["vae"]["scaling_factor"] == 0.5  # the init_from VAE's, not the config's 1.0
    assert system.from_config(config).adapters == system.CONTROLNET.adapters
    controlnet = items["controlnet"]
    assert np.any(controlnet["controlnet_mid_block"]["kernel"])  # trained off its zero start
    # Four small steps from the U-Net's copy: near it, not equal.
    start, now = base["unet"]["mid_block"], controlnet["mid_block"]
    gaps = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(start))]
    assert 0 < max(gaps) < 0.05
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [c["loss"] for c in curve if "loss" in c] + [c["eval_loss"] for c in curve
                                                          if "eval_loss" in c]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["diffusion_train_step_compilations"] == 1
    assert summary["controlnet"] == str(workdir / "controlnet")


def test_a_killed_run_resumes_bitwise(runs):
    root, uninterrupted, init = runs
    workdir = root / "killed"
    process = subprocess.Popen(_train_command(workdir, init, config=TINY_CONTROLNET), cwd=REPO,
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (workdir / "checkpoints" / "2").is_dir():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(_train_command(workdir, init, config=TINY_CONTROLNET),
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    names = ["controlnet", "optimizer"]
    expected, _ = checkpoint.load(uninterrupted / "checkpoints", items=names)
    resumed, _ = checkpoint.load(workdir / "checkpoints", items=names)
    jax.tree.map(np.testing.assert_array_equal, resumed, expected)


def test_the_controlnet_checkpoint_samples_and_exports(runs, tmp_path):
    """WORKDIR/controlnet: the trained ControlNet alone, as `convert` writes one; `sample
    --controlnet` steers the base with it and `export` gives diffusers a ControlNetModel
    with the same weights."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    from PIL import Image

    from diffusion_jax.cli import main
    from diffusion_jax.convert.torch_params import params_to_state_dict

    root, workdir, _ = runs
    items, config, _ = checkpoint.load_models(workdir / "controlnet")
    assert system.from_config(config) == system.CONTROLNET
    trained, _ = checkpoint.load(workdir / "checkpoints", items=["controlnet"])
    jax.tree.map(np.testing.assert_array_equal, items["controlnet"], trained["controlnet"])

    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8] = edges[8:24, 23] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    sample = ["sample", "--checkpoint", str(root / "base"), "--prompt", "a photo of a bag",
              "--steps", "2", "--height", "32", "--width", "32", "--seed", "0"]
    main([*sample, "--controlnet", str(workdir / "controlnet"), "--control-image",
          str(tmp_path / "edges.png"), "--out", str(tmp_path / "controlled.npy")])
    main([*sample, "--out", str(tmp_path / "plain.npy")])
    controlled, plain = np.load(tmp_path / "controlled.npy"), np.load(tmp_path / "plain.npy")
    assert controlled.shape == plain.shape == (1, 32, 32, 3)
    assert np.max(np.abs(controlled - plain)) > 1e-4  # the trained residuals are not zero

    main(["export", "--checkpoint", str(workdir / "controlnet"), "--to", "diffusers",
          "--out", str(tmp_path / "diffusers")])
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "diffusers")
    expected = params_to_state_dict(items["controlnet"])
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], torch.from_numpy(np.asarray(value))), key


def test_edge_agreement_with_and_without_the_controlnet(runs):
    """The demo's figure on the tiny run: held-out Canny edges, their class captions, the
    same seeds with and without the ControlNet; each score is the F1 the samples give."""
    from diffusion_jax.data import fashion_mnist, input_pipeline
    from diffusion_jax.eval import edges
    from diffusion_jax.pipeline import load

    root, workdir, _ = runs
    config = load_config_file(TINY_CONTROLNET)
    text = system.text_inputs(system.from_config(config), trainer.model_config(config))
    batch = input_pipeline.make_eval_batches(config.data, text, num_examples=2, batch_size=2)[0]
    prompts = [fashion_mnist.caption(label) for label in batch["label"]]
    options = dict(sampler="ddim", steps=2, guidance=2.0)
    # BENCHMARKS.md's command for the demo's figure, on the tiny run.
    results = edges.main(["--config", str(TINY_CONTROLNET), "--base", str(root / "base"),
                          "--controlnet", str(workdir / "controlnet"), "--examples", "2",
                          "--steps", "2", "--guidance", "2"])
    steered = load(root / "base", controlnet=workdir / "controlnet")
    samples = np.concatenate([steered.txt2img(p, seed=i, output_type="float32",
                                              control_image=c, **options)
                              for i, (p, c) in enumerate(zip(prompts, batch["condition"]))])
    assert results["edge_f1_controlnet"] == edges.edge_agreement(batch["condition"], samples)
    assert set(results) == {"edge_f1_base", "edge_f1_controlnet"}
    assert 0.0 <= results["edge_f1_base"] <= 1.0
    with pytest.raises(ValueError, match="one prompt per image"):
        edges.with_and_without_controlnet(root / "base", workdir / "controlnet",
                                          batch["condition"], prompts[:1])


@pytest.mark.parametrize("overrides, message", [
    ({"data.condition": ""}, "the ControlNet trains on condition images"),
    ({"controlnet.conditioning_embedding_out_channels": (4, 8)},
     "take the condition image to the latents' size: 4x smaller"),
    ({"final_eval.samples_per_class": 2}, "its samples have no condition images"),
])
def test_controlnet_settings_are_checked_before_training(overrides, message):
    from diffusion_jax.training import preflight

    config = load_config_file(TINY_CONTROLNET)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ValueError, match=message):
        preflight.check_config(config)


def test_a_condition_without_a_controlnet_is_refused():
    from diffusion_jax.training import preflight

    config = load_config_file(TINY_BASE)
    config.data.condition = "canny"
    with pytest.raises(ValueError, match="data.condition.*is for a system with a ControlNet"):
        preflight.check_config(config)

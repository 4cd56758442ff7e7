"""The colab/ notebooks run top to bottom in a Jupyter kernel on CPU, with tiny settings
injected into their `parameters` cells, so they cannot rot: txt2img.ipynb on a random-weight
checkpoint of configs/tiny.py, train.ipynb on configs/tiny_train.py."""

import ast
import json
import os
from pathlib import Path

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from diffusion_jax import checkpoint

REPO = Path(__file__).resolve().parent.parent
COLAB = REPO / "colab"
SAMPLERS = ["dpmpp_2m_karras", "euler_ancestral", "ddim"]
SIZE = 16  # configs/tiny.py: sides must be multiples of 4
NUM_IMAGES = 2


def _parameter_names(cell) -> set[str]:
    return {target.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
            for target in node.targets}


def _execute(name: str, parameters: dict, cwd: Path) -> nbformat.NotebookNode:
    """Runs notebook `name` with `parameters` appended to its parameters cell (as papermill
    injects them), in a fresh kernel whose working directory is `cwd`; returns it with outputs."""
    notebook = nbformat.read(COLAB / name, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged `parameters`"
    unknown = set(parameters) - _parameter_names(tagged[0])
    assert not unknown, f"{name} has no parameters {unknown}"
    tagged[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    return notebook


def _displayed_images(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def _printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs)


def _tiles(path: Path, size: int) -> np.ndarray:
    grid = np.asarray(Image.open(path).convert("RGB"))
    return np.stack([grid[:, i:i + size] for i in range(0, grid.shape[1], size)])


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """configs/tiny.py with random weights, as a converted checkpoint (drawn from the param
    shapes: Flax's own init would take longer than both notebooks on a busy CPU)."""
    from diffusion_jax import system
    from diffusion_jax.configs import tiny
    from diffusion_jax.bench.weights import random_params

    config = tiny.get_config().to_dict()
    params = {tower.name: random_params(tower.kind, config[tower.name], seed)
              for seed, tower in enumerate(system.from_config(config).towers)}
    checkpoint.create(tmp_path / "ckpt", params, config)
    return tmp_path / "ckpt"


def test_txt2img_notebook_writes_a_grid_per_sampler_and_an_img2img_grid(tiny_checkpoint, tmp_path):
    out = tmp_path / "outputs"
    notebook = _execute("txt2img.ipynb", dict(
        CHECKPOINT=str(tiny_checkpoint), OUTPUT_DIR=str(out), PROMPT="a photo of a cat",
        STEPS=3, SIZE=SIZE, NUM_IMAGES=NUM_IMAGES, SAMPLERS=SAMPLERS), tmp_path)

    grids = {}
    for sampler in SAMPLERS:
        path = out / f"txt2img_{sampler}.png"
        image = Image.open(path)
        assert image.size == (NUM_IMAGES * SIZE, SIZE)
        assert image.text["sampler"] == sampler and image.text["prompt"] == "a photo of a cat"
        assert json.loads(image.text["seeds"]) == [0, 1] and json.loads(image.text["steps"]) == 3
        grids[sampler] = _tiles(path, SIZE)
        assert grids[sampler].std(axis=(1, 2, 3)).min() > 0  # no blank image
        assert np.abs(grids[sampler][0].astype(int) - grids[sampler][1]).max() > 0  # seeds differ
    # The samplers really differ: a notebook that ignored SAMPLERS would write equal grids.
    assert len({grids[s].tobytes() for s in SAMPLERS}) == len(SAMPLERS)

    img2img = out / "img2img.png"
    assert Image.open(img2img).size == ((NUM_IMAGES + 1) * SIZE, SIZE)
    assert json.loads(Image.open(img2img).text["strength"]) == 0.6
    tiles = _tiles(img2img, SIZE)
    np.testing.assert_array_equal(tiles[0], grids[SAMPLERS[0]][0])  # the default init image
    assert tiles[1:].std(axis=(1, 2, 3)).min() > 0
    assert _displayed_images(notebook) == len(SAMPLERS) + 1


def test_txt2img_notebook_converts_a_diffusers_folder(tiny_checkpoint, tmp_path):
    from diffusion_jax import convert

    convert.export(tiny_checkpoint, tmp_path / "diffusers")
    converted, out = tmp_path / "converted", tmp_path / "outputs"
    notebook = _execute("txt2img.ipynb", dict(
        DIFFUSERS_DIR=str(tmp_path / "diffusers"), CONVERTED_DIR=str(converted),
        OUTPUT_DIR=str(out), STEPS=3, SIZE=SIZE, NUM_IMAGES=NUM_IMAGES, SAMPLERS=["ddim"]),
        tmp_path)

    assert f"converted {tmp_path / 'diffusers'} -> {converted}" in _printed(notebook)
    ours, _ = checkpoint.load(converted)
    original, _ = checkpoint.load(tiny_checkpoint)
    for name in ("unet", "vae", "text_encoder"):  # a lossless float32 round trip
        jax.tree.map(np.testing.assert_array_equal, ours[name], original[name])
    assert Image.open(out / "txt2img_ddim.png").size == (NUM_IMAGES * SIZE, SIZE)
    assert (out / "img2img.png").is_file()


def test_train_notebook_trains_and_shows_samples_and_summary(tmp_path):
    workdir = tmp_path / "workdir"
    notebook = _execute("train.ipynb", dict(
        CONFIG=str(REPO / "configs" / "tiny_train.py"), WORKDIR=str(workdir),
        OVERRIDES={"log_every_steps": 1}, TENSORBOARD=False), tmp_path)

    # The override took (tiny_train logs every 2 steps); a host-side one, so the compiled
    # programs are tests/test_training.py's and the persistent compilation cache serves both.
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve if "loss" in c] == list(range(1, 6 + 8 + 1))  # 6 VAE + 8 U-Net
    assert checkpoint.steps(workdir / "checkpoints")[-1] == 14
    saved = set(checkpoint.item_names(workdir / "checkpoints"))
    assert {"unet", "unet_ema", "vae", "text_encoder"} <= saved
    grids = sorted((workdir / "samples").glob("*.png"))
    assert grids and grids[-1].name == "step_0000014.png"
    grid = np.asarray(Image.open(grids[-1]))
    assert grid.shape == (2 * 32, 2 * 32, 3) and grid.std() > 0  # 2 prompts x 2 seeds, 32 pixels
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["vae_scaling_factor"] > 0 and Path(summary["samples"]) == grids[-1]
    assert list((workdir / "tensorboard").iterdir())
    assert _displayed_images(notebook) == len(grids)
    printed = _printed(notebook)
    assert "class accuracy: off" in printed and "FID: off" in printed
    assert '"vae_scaling_factor"' in printed  # the summary is shown

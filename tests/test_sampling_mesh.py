"""Sampling on the training mesh: what `prepare` ships per mode (on the tiny SD 1.x
fixture, whose pixels test_system checks) and the trainer's sampler on 8 fake devices
(mesh data=2 x fsdp=4) running the program on the training params' own shardings, with
the images of one device.

The 8-device check runs this file as a script in a subprocess (this pytest process may
already hold a 1-device JAX backend).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
FSDP_MIN_SIZE = 256  # the tiny U-Net's convolution and attention kernels shard over fsdp


@pytest.fixture(scope="module")
def pipe():
    from diffusion_jax import pipeline

    return pipeline.load(FIXTURES / "v1_checkpoint", cache_dir=None)


def test_prepare_ships_only_what_the_mode_reads(pipe):
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.full((16, 16), 255, np.uint8)
    txt2img = pipe.prepare("txt2img", ["a cat", "a dog"], sampler="ddim", steps=2)
    assert sorted(txt2img.inputs) == ["guidance", "guidance_rescale", "negative_text", "noise",
                                      "text"]
    assert set(txt2img.inputs["text"]) == set(pipe.system.ids_keys)
    unguided = pipe.prepare("txt2img", "a cat", sampler="euler_ancestral", steps=2, guidance=1.0)
    assert sorted(unguided.inputs) == ["noise", "step_noise", "text"]
    assert unguided.inputs["step_noise"].shape[:2] == (1, unguided.plan.num_evaluations)
    img2img = pipe.prepare("img2img", "a cat", init_image=image, strength=0.5, sampler="ddim",
                           steps=2, guidance=1.0)
    assert sorted(img2img.inputs) == ["init_images", "noise", "text"]
    inpaint = pipe.prepare("inpaint", "a cat", init_image=image, mask=mask, sampler="ddim",
                           steps=2, guidance=1.0)
    assert sorted(inpaint.inputs) == ["init_images", "masks", "noise", "text"]
    assert pipe.num_compilations == 0


def test_trainer_samples_from_its_sharded_params_on_eight_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "same images on 8 devices and 1" in result.stdout


def _eight_devices() -> None:
    import jax
    from etils import epath

    from diffusion_jax import checkpoint, generate, image_files, parallel, pipeline, system
    from diffusion_jax.config_files import load
    from diffusion_jax.training import sample_grids, trainer

    assert jax.device_count() == 8
    config = load(REPO / "configs" / "tiny_train.py")
    config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 4, FSDP_MIN_SIZE
    ckpt_config = trainer.model_config(config)
    mesh = parallel.make_mesh(config.mesh)
    host = checkpoint.initial_params(ckpt_config, seed=0)
    shardings = parallel.param_shardings(host, mesh, FSDP_MIN_SIZE)
    towers = parallel.shard_params(host, shardings)  # as the trainer holds them
    ema = {"unet": jax.jit(lambda p: jax.tree.map(lambda x: 0.9 * x, p),
                           out_shardings=shardings["unet"])(towers["unet"])}
    run = SimpleNamespace(config=config, mesh=mesh, ckpt_config=ckpt_config, writer=None,
                          workdir=epath.Path(tempfile.mkdtemp()), is_main=True, towers=towers,
                          ema=ema, system=system.from_config(ckpt_config))
    sampler = sample_grids.GridSampler(run)
    params = trainer.sampling_params(run)
    assert params["unet"] is ema["unet"] and params["vae"] is towers["vae"]
    # Held params go in as they are: no host copy, no device copy.
    placed = sampler.pipe.place(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(params)))

    prompts, seeds, cfg = ["a photo of a t-shirt", "a photo of a bag", "a cat"], [0, 1, 2], config.sample
    options = dict(seed=seeds, sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance)
    images = sampler.generate(prompts, seeds, params)
    ours = sampler.pipe.txt2img(prompts, "", output_type="float32", params=params, **options)
    assert sampler.pipe.num_compilations == 1  # uint8 or float32 out: the same program
    np.testing.assert_array_equal(images, image_files.to_uint8(ours))

    # The compiled program takes the params on the training shardings, kernels split over fsdp.
    (program,) = sampler.pipe._programs.values()
    prepared = sampler.pipe.prepare("txt2img", prompts, "", **options)
    assert len(jax.tree.leaves(prepared.inputs["noise"])) == 1 and prepared.inputs["noise"].shape[0] == 8
    inputs = pipeline._on_mesh(prepared.inputs, generate.input_shardings(prepared.inputs, mesh))
    compiled_params = program.lower(placed, inputs).compile().input_shardings[0][0]
    expected = parallel.param_shardings(params, mesh, FSDP_MIN_SIZE)
    is_leaf = lambda x: x is None or isinstance(x, jax.sharding.Sharding)
    for name in params:  # None: an array the program never reads (txt2img: the VAE encoder)
        flat = jax.tree.leaves(params[name])
        got = jax.tree.leaves(compiled_params[name], is_leaf=is_leaf)
        want = jax.tree.leaves(expected[name], is_leaf=is_leaf)
        assert len(got) == len(want) == len(flat), name
        assert all(g is None or g.is_equivalent_to(w, x.ndim) for g, w, x in zip(got, want, flat))
        if name != "vae":
            assert None not in got, name
    want = jax.tree.leaves(expected, is_leaf=is_leaf)
    sharded = sum(not w.is_fully_replicated for w in want)
    assert sharded >= 10, f"only {sharded} param arrays shard over fsdp"
    print(f"{sharded} of {len(want)} param arrays sharded over fsdp")

    one = pipeline.StableDiffusion(jax.device_get(params), ckpt_config, devices=jax.devices()[:1])
    reference = one.txt2img(prompts, "", output_type="float32", **options)
    print("max difference", np.abs(ours - reference).max())
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    print("same images on 8 devices and 1")


if __name__ == "__main__":
    _eight_devices()

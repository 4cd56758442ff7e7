"""End-to-end sampling against diffusers' own pipelines on the same tiny random weights.

A tiny `StableDiffusionPipeline` is saved to disk, converted with `diffusion-jax convert`, and
sampled with `diffusion-jax sample --init-latents`; its pixels must equal diffusers' output
from the same starting latents.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax import cli, image_files, pipeline  # noqa: E402
from diffusion_jax.tokenizer import CLIPTokenizer  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SIZE = 32  # 4x4 latents: the tiny VAE downsamples 8x
PIXEL_TOLERANCE = 2e-3

SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012, prediction_type="epsilon", timestep_spacing="leading",
                steps_offset=1, set_alpha_to_one=False)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: norms and biases too, so no parameter is trivially 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def _diffusers_pipeline(tokenizer_dir) -> "diffusers.StableDiffusionPipeline":
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=SIZE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    for seed, module in enumerate((unet, vae, text_encoder)):
        _perturb(module, seed)
    CLIPTokenizer.bundled().save_pretrained(tokenizer_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.PNDMScheduler(**SCHEDULE, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """(diffusers pipeline, converted checkpoint dir, work dir)."""
    root = tmp_path_factory.mktemp("pipeline")
    reference = _diffusers_pipeline(root / "tokenizer")
    reference.save_pretrained(root / "diffusers")
    assert cli.main(["convert", "--from", "diffusers", str(root / "diffusers"),
                     "--out", str(root / "ckpt")]) == 0
    return reference, root / "ckpt", root


def _latents(seed: int, count: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 4, SIZE // 8, SIZE // 8)).astype(np.float32)


def _sample_cli(root, ckpt, name, latents, *extra):
    np.save(root / f"{name}_latents.npy", latents)
    out = root / f"{name}.npy"
    argv = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--steps", "5", "--guidance", "7.5", "--num-images", str(len(latents)),
            "--height", str(SIZE), "--width", str(SIZE),
            "--init-latents", str(root / f"{name}_latents.npy"), "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return np.load(out)


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_txt2img_matches_diffusers(systems, sampler):
    reference, ckpt, root = systems
    latents = _latents(1)
    ours = _sample_cli(root, ckpt, f"txt2img_{sampler}", latents, "--sampler", sampler)

    # SD's scheduler_config.json says clip_sample=false; DDIMScheduler's default is true.
    reference.scheduler = SCHEDULERS[sampler].from_config(reference.scheduler.config,
                                                          clip_sample=False)
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5,
                         guidance_scale=7.5, num_images_per_prompt=2, height=SIZE, width=SIZE,
                         latents=torch.from_numpy(latents), output_type="np").images
    assert ours.shape == expected.shape == (2, SIZE, SIZE, 3) and ours.dtype == np.float32
    assert np.abs(expected - 0.5).max() > 0.05, "reference images are flat: the test would be weak"
    error = np.abs(ours - expected).max()
    print(f"{sampler}: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE, f"{sampler}: max pixel error {error:.2e}"


def test_img2img_matches_diffusers(systems, monkeypatch):
    reference, ckpt, root = systems
    image = (np.random.default_rng(3).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "init.png")
    latents = _latents(2, count=1)
    ours = _sample_cli(root, ckpt, "img2img", latents, "--sampler", "ddim",
                       "--init-image", str(root / "init.png"), "--strength", "0.6")

    # diffusers draws the img2img noise and a posterior sample from its generator; give it our
    # noise and the posterior mode, which is what we use.
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config,
                                                            clip_sample=False)
    module = sys.modules[type(img2img).__module__]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(latents))
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, sample_mode="argmax"))
    expected = img2img(PROMPT, image=Image.fromarray(image), negative_prompt=NEGATIVE, strength=0.6,
                       num_inference_steps=5, guidance_scale=7.5, output_type="np").images
    error = np.abs(ours - expected).max()
    print(f"img2img: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE, f"img2img: max pixel error {error:.2e}"


PNG_RUN = ["--prompt", "a cat", "--negative-prompt", "blurry", "--sampler", "ddim", "--steps",
           "5", "--seed", "7", "--num-images", "2", "--height", str(SIZE), "--width", str(SIZE)]


def test_png_output_records_the_run(systems):
    from diffusion_jax import __version__

    _, ckpt, root = systems
    out = root / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(ckpt), *PNG_RUN, "--columns", "1",
                     "--out", str(out)]) == 0
    png = Image.open(out)
    assert png.size == (SIZE, 2 * SIZE)  # one column
    text_keys = ("prompt", "negative_prompt", "sampler", "checkpoint", "diffusion_jax_version",
                 "parameters")  # as they are; the other values are JSON
    info = {key: value if key in text_keys else json.loads(value)
            for key, value in png.text.items()}
    assert info == dict(prompt="a cat", negative_prompt="blurry", seeds=[7, 8], sampler="ddim",
                        steps=5, guidance=7.5, guidance_rescale=0.0, eta=0.0, height=SIZE,
                        width=SIZE, checkpoint=str(ckpt), checkpoint_step=0, ema=False,
                        diffusion_jax_version=__version__, parameters=info["parameters"])
    assert info["parameters"] == (  # A1111's infotext: the grid is labelled with its first seed
        f"a cat\nNegative prompt: blurry\nSteps: 5, Sampler: DDIM, CFG scale: 7.5, Seed: 7, "
        f"Size: {SIZE}x{SIZE}, Model: ckpt, Version: diffusion_jax {__version__}")


def test_folder_output_is_one_png_per_image_and_the_grid(systems):
    """`--out DIR/`, here from a step folder as `--checkpoint`: each image with its own seed."""
    _, ckpt, root = systems
    out = root / "images"
    assert cli.main(["sample", "--checkpoint", str(ckpt / "0"), *PNG_RUN,
                     "--out", f"{out}/"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-8.png", "grid.png"]
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * SIZE, SIZE) and json.loads(grid.text["seeds"]) == [7, 8]
    for i, seed in enumerate([7, 8]):
        png = Image.open(out / f"0000{i}-{seed}.png")
        assert png.size == (SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(png), np.asarray(grid)[:, i * SIZE:(i + 1) * SIZE])
        assert json.loads(png.text["seeds"]) == [seed]
        assert f", Seed: {seed}, " in png.text["parameters"]
        assert png.text["checkpoint"] == str(ckpt) and png.text["checkpoint_step"] == "0"


def test_a1111_sampler_names():
    names = {s: image_files.a1111_sampler_name(s) for s in (
        "dpmpp_2m_karras", "euler_ancestral", "dpmpp_2m_sde", "pndm", "unipc_karras")}
    assert names == {"dpmpp_2m_karras": "DPM++ 2M Karras", "euler_ancestral": "Euler a",
                     "dpmpp_2m_sde": "DPM++ 2M SDE", "pndm": "PLMS", "unipc_karras": "UniPC Karras"}
    assert set(image_files.A1111_SAMPLER_NAMES) == set(pipeline.samplers.SAMPLERS) | set(
        pipeline.samplers.FLOW_SAMPLERS)
    assert image_files.a1111_sampler_name("flow_euler") == "Euler"


def test_strength_0_returns_the_init_image(systems):
    _, ckpt, root = systems
    pipe = pipeline.load(ckpt, cache_dir=None)
    image = (np.random.default_rng(6).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    options = dict(strength=0, num_images=2, height=SIZE, width=SIZE)
    np.testing.assert_array_equal(pipe.img2img("x", image, **options), [image, image])
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    np.testing.assert_array_equal(pipe.inpaint("x", image, mask, **options), [image, image])
    assert pipe.num_compilations == 0  # nothing to run
    Image.fromarray(image).save(root / "strength0.png")
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--prompt", "x", "--init-image",
                     str(root / "strength0.png"), "--strength", "0", "--height", str(SIZE),
                     "--width", str(SIZE), "--out", str(root / "strength0.npy")]) == 0
    np.testing.assert_array_equal(np.load(root / "strength0.npy"), image[None] / np.float32(255))


def test_one_compile_per_shape_and_per_image_seeds(systems):
    _, ckpt, _ = systems
    pipe = pipeline.load(ckpt, cache_dir=None)
    options = dict(sampler="euler_ancestral", steps=3, height=SIZE, width=SIZE,
                   output_type="float32")
    batch = pipe.txt2img(["a cat", "a dog"], seed=[10, 11], **options)
    again = pipe.txt2img(["a cat", "a dog"], seed=[10, 11], **options)
    other = pipe.txt2img(["a dog", "a cat"], seed=[11, 10], **options)
    assert pipe.num_compilations == 1  # new prompts and seeds reuse the compiled program
    np.testing.assert_array_equal(batch, again)
    # An image depends on its own seed only: the same in either batch position, up to float
    # rounding (XLA may tile a batched matmul differently for the other row order).
    np.testing.assert_allclose(batch, other[::-1], atol=1e-5, rtol=0)
    assert not np.array_equal(batch[0], batch[1])


@pytest.fixture
def program_cache_dir(tmp_path):
    """A fresh persistent-cache folder for one test, JAX's setting restored afterwards."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    yield str(tmp_path / "xla")
    jax.config.update("jax_compilation_cache_dir", before)


def test_exported_program_is_reused_without_tracing(systems, program_cache_dir, monkeypatch,
                                                   caplog):
    """A later pipeline (as a later process would) reads the lowered program instead of
    tracing the models again, and makes the same pixels; an edit to the code or a torn file
    means a fresh export, never a stale or broken program."""
    from diffusion_jax import program_cache

    _, ckpt, _ = systems
    options = dict(sampler="euler_ancestral", steps=3, height=SIZE, width=SIZE, seed=[3, 4],
                   output_type="float32")
    first = pipeline.load(ckpt, cache_dir=program_cache_dir)
    images = first.txt2img(["a cat", "a dog"], **options)
    assert (first.num_compilations, first.num_programs_loaded) == (1, 0)
    files = list((program_cache.directory()).glob("*" + program_cache.SUFFIX))
    assert len(files) == 1

    second = pipeline.load(ckpt, cache_dir=program_cache_dir)
    np.testing.assert_array_equal(second.txt2img(["a cat", "a dog"], **options), images)
    assert (second.num_compilations, second.num_programs_loaded) == (0, 1)
    # Another shape is another program.
    second.txt2img("a cat", **options | dict(seed=[3]))
    assert (second.num_compilations, second.num_programs_loaded) == (1, 1)

    monkeypatch.setattr(program_cache, "code_fingerprint", lambda: "edited source")
    edited = pipeline.load(ckpt, cache_dir=program_cache_dir)
    np.testing.assert_array_equal(edited.txt2img(["a cat", "a dog"], **options), images)
    assert (edited.num_compilations, edited.num_programs_loaded) == (1, 0)

    for path in program_cache.directory().glob("*" + program_cache.SUFFIX):
        path.write_bytes(path.read_bytes()[:100])  # torn
    torn = pipeline.load(ckpt, cache_dir=program_cache_dir)
    np.testing.assert_array_equal(torn.txt2img(["a cat", "a dog"], **options), images)
    assert (torn.num_compilations, torn.num_programs_loaded) == (1, 0)
    assert "ignoring unreadable exported program" in caplog.text


def test_bad_input_is_rejected_before_compiling(systems, tmp_path):
    _, ckpt, root = systems
    pipe = pipeline.load(ckpt, cache_dir=None)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    cases = [
        (dict(prompt="x", sampler="dpm_fast"), "unknown sampler 'dpm_fast'; valid samplers: ddpm"),
        (dict(prompt="x", height=36, width=SIZE), "multiples of"),
        (dict(prompt=[]), "empty prompt list"),
        (dict(prompt="x", init_latents=np.zeros((1, 4, 3, 3))), "init_latents has shape"),
        (dict(prompt="x", guidance_rescale=2.0), r"guidance_rescale=2.0: must be in \[0, 1\]"),
        (dict(prompt="x", steps=0), "steps=0: must be a positive integer"),
        (dict(prompt="x", true_cfg=3.0), "true_cfg applies to Flux.1 checkpoints"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            pipe.txt2img(**{"height": SIZE, "width": SIZE, **kwargs})
    with pytest.raises(ValueError, match=r"strength=1.5: must be in \[0, 1\]"):
        pipe.img2img("x", image, strength=1.5, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="mask is 16x16"):
        pipe.inpaint("x", image, np.ones((16, 16)), height=SIZE, width=SIZE)
    assert pipe.num_compilations == 0
    with pytest.raises(Exception, match="is not a diffusion_jax checkpoint"):
        pipeline.load(tmp_path)
    # The CLI prints one line and exits non-zero.
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--prompt", "x", "--sampler", "nope",
                     "--out", str(root / "x.png")]) != 0


def _diffusers_inpaint(inpaint, monkeypatch, image, mask, latents) -> np.ndarray:
    """diffusers' inpainting output, encoding images with the posterior mode as ours does."""
    module = sys.modules[type(inpaint).__module__]
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, sample_mode="argmax"))
    return inpaint(PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                   negative_prompt=NEGATIVE, strength=1.0, num_inference_steps=5,
                   guidance_scale=7.5, height=SIZE, width=SIZE,
                   latents=torch.from_numpy(latents), output_type="np").images


def test_inpaint_matches_diffusers(systems, monkeypatch):
    """Standard 4-channel U-Net: latent blending after every step, as diffusers does it."""
    reference, ckpt, root = systems
    image = (np.random.default_rng(4).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 - 3:] = 255  # repaint the right part; the seam is not on the latent grid
    Image.fromarray(image).save(root / "inpaint_init.png")
    Image.fromarray(mask).save(root / "inpaint_mask.png")
    latents = _latents(5, count=1)
    ours = _sample_cli(root, ckpt, "inpaint", latents, "--sampler", "euler",
                       "--init-image", str(root / "inpaint_init.png"),
                       "--mask", str(root / "inpaint_mask.png"))

    inpaint = diffusers.StableDiffusionInpaintPipeline(**reference.components)
    inpaint.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = _diffusers_inpaint(inpaint, monkeypatch, image, mask, latents)
    error = np.abs(ours - expected).max()
    print(f"inpaint: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE, f"inpaint: max pixel error {error:.2e}"


def test_nine_channel_inpainting_unet_matches_diffusers(systems, monkeypatch):
    """The inpainting U-Net: latents + mask + masked-image latents as 9 input channels."""
    reference, _, root = systems
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**{**reference.unet.config, "in_channels": 9})
    _perturb(unet, 7)
    inpaint = diffusers.StableDiffusionInpaintPipeline(
        **{**reference.components, "unet": unet,
           "scheduler": diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False)})
    inpaint.save_pretrained(root / "diffusers_inpaint")
    assert cli.main(["convert", "--from", "diffusers", str(root / "diffusers_inpaint"),
                     "--out", str(root / "ckpt_inpaint")]) == 0
    image = (np.random.default_rng(8).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SIZE // 3:, :] = 255
    Image.fromarray(image).save(root / "inpaint9_init.png")
    Image.fromarray(mask).save(root / "inpaint9_mask.png")
    latents = _latents(9, count=1)
    ours = _sample_cli(root, root / "ckpt_inpaint", "inpaint9", latents, "--sampler", "ddim",
                       "--init-image", str(root / "inpaint9_init.png"),
                       "--mask", str(root / "inpaint9_mask.png"))

    expected = _diffusers_inpaint(inpaint, monkeypatch, image, mask, latents)
    error = np.abs(ours - expected).max()
    print(f"9-channel inpaint: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE, f"9-channel inpaint: max pixel error {error:.2e}"


DEVICE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    from diffusion_jax import pipeline
    assert len(jax.devices()) == 8
    pipe8 = pipeline.load(sys.argv[1], cache_dir=None)
    pipe1 = pipeline.load(sys.argv[1], cache_dir=None, devices=jax.devices()[:1])
    options = dict(sampler="dpmpp_2m_sde", steps=3, seed=5, num_images=3, height=32, width=32,
                   output_type="float32")
    a, b = pipe8.txt2img("a cat", **options), pipe1.txt2img("a cat", **options)
    print("max difference", np.abs(a - b).max())
    np.testing.assert_allclose(a, b, atol=1e-5)
""")


def test_same_images_on_one_and_eight_devices(systems):
    _, ckpt, _ = systems
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(ckpt)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _flow_pipeline(ckpt):
    """The converted tiny pipeline's weights on SD3's rectified-flow schedule."""
    params, config, _ = pipeline.checkpoint.load_models(ckpt)
    config = {**config, "schedule": {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                     "num_train_timesteps": 1000, "shift": 3.0}}
    return pipeline.StableDiffusion(params, config, export_programs=False)


def _diffusers_flow_loop(reference, latents, *, steps, start=0, init_image=None):
    """What diffusers' SD3 pipelines do (CFG, FlowMatchEulerDiscreteScheduler steps, img2img
    by scale_noise from t_start = int(n - n strength)) with this U-Net, VAE and text tower."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start:]
    positive, negative = reference.encode_prompt(PROMPT, "cpu", len(latents), True, NEGATIVE)
    x = torch.from_numpy(latents)
    with torch.no_grad():
        if init_image is not None:
            pixels = torch.from_numpy(init_image).permute(2, 0, 1)[None].float() / 127.5 - 1
            encoded = reference.vae.encode(pixels).latent_dist.mode()
            encoded = (encoded * reference.vae.config.scaling_factor).repeat(len(latents), 1, 1, 1)
            scheduler.set_begin_index(start)
            x = scheduler.scale_noise(encoded, timesteps[:1], x)
        for t in timesteps:
            out = reference.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
                [negative, positive])).sample
            uncond, cond = out.chunk(2)
            x = scheduler.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
        images = reference.vae.decode(x / reference.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_rectified_flow_schedule_txt2img_and_img2img_match_diffusers_loop(systems):
    """A checkpoint whose schedule is a FlowMatch config samples as a rectified flow, through
    the same pipeline: pixels equal diffusers' flow loop on the same weights."""
    reference, ckpt, _ = systems
    pipe = _flow_pipeline(ckpt)
    latents = _latents(4)
    ours = pipe.txt2img(PROMPT, NEGATIVE, sampler="flow_euler", steps=5, guidance=7.5,
                        num_images=2, height=SIZE, width=SIZE, init_latents=latents,
                        output_type="float32")
    expected = _diffusers_flow_loop(reference, latents, steps=5)
    assert np.abs(expected - 0.5).max() > 0.05
    error = np.abs(ours - expected).max()
    print(f"flow txt2img: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE

    image = (np.random.default_rng(5).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    ours = pipe.img2img(PROMPT, image, NEGATIVE, strength=0.55, sampler="flow_euler", steps=5,
                        guidance=7.5, num_images=2, height=SIZE, width=SIZE,
                        init_latents=latents, output_type="float32")
    # 5 steps at strength 0.55: the flow pipelines skip int(5 - 2.75) = 2 (SD's skip 3).
    expected = _diffusers_flow_loop(reference, latents, steps=5, start=2, init_image=image)
    error = np.abs(ours - expected).max()
    print(f"flow img2img: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE

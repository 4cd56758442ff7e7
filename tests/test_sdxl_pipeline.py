"""SDXL sampling end to end against diffusers' SDXL pipelines on the same tiny random weights.

A tiny SDXL base (`StableDiffusionXLPipeline`) and refiner (`StableDiffusionXLImg2ImgPipeline`
with bigG alone and an aesthetic score) are saved, converted with `diffusion-jax convert` and
sampled with `diffusion-jax sample --init-latents`: txt2img with a negative prompt and with an
empty one (zeros, as the base's model_index says), prompt_2 and the size/crop flags, img2img,
inpaint, the refiner alone, and the base + refiner ensemble of experts.
"""

import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax import cli, pipeline  # noqa: E402
from diffusion_jax.tokenizer import CLIPTokenizer  # noqa: E402
from test_convert_sdxl import tiny_sdxl_config  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SIZE = 16  # 8x8 latents: the tiny VAE downsamples 2x
PIXEL_TOLERANCE = 1e-4  # observed: <= 2.1e-5 (DDIM), 1e-7 otherwise; the issue asks 2e-3
STEPS, GUIDANCE = 5, 5.0


def randomize(*models, scale: float = 0.1) -> None:
    """Every parameter of the PyTorch models drawn from N(0, scale^2) (their inits leave
    zeros and ones that would hide mistakes); eval mode."""
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.copy_(scale * torch.randn_like(param))
            model.eval()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(base pipeline, base checkpoint, refiner pipeline, refiner checkpoint, work dir)."""
    root = tmp_path_factory.mktemp("sdxl_pipeline")
    config = tiny_sdxl_config()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**config["unet"])
    vae = diffusers.AutoencoderKL(**config["vae"])
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config["text_encoder"]))
    big_g = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**config["text_encoder_2"]))
    # The refiner: bigG's context alone, five micro-conditioning numbers (aesthetic score).
    refiner_unet = diffusers.UNet2DConditionModel(**{
        **config["unet"], "cross_attention_dim": 32,
        "projection_class_embeddings_input_dim": 16 + 5 * 8})
    randomize(unet, vae, clip_l, big_g, refiner_unet)
    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        CLIPTokenizer.bundled(pad_token=config[name]["pad_token"]).save_pretrained(root / name)
        tokenizers[name] = transformers.CLIPTokenizer.from_pretrained(root / name)
    scheduler = diffusers.EulerDiscreteScheduler(**{
        k: v for k, v in config["schedule"].items() if k != "set_alpha_to_one"})
    base = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip_l, text_encoder_2=big_g, unet=unet, scheduler=scheduler,
        **tokenizers, add_watermarker=False)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=big_g, tokenizer=None,
        tokenizer_2=tokenizers["tokenizer_2"], unet=refiner_unet, scheduler=scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False)
    for name, pipe in (("base", base), ("refiner", refiner)):
        pipe.save_pretrained(root / name)
        assert cli.main(["convert", "--from", "diffusers", str(root / name),
                         "--out", str(root / f"{name}_ckpt")]) == 0
    return base, root / "base_ckpt", refiner, root / "refiner_ckpt", root


def _latents(seed: int, count: int = 1) -> np.ndarray:
    shape = (count, 4, SIZE // 2, SIZE // 2)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _sample_cli(root, ckpt, name, latents, *extra, negative=NEGATIVE):
    np.save(root / f"{name}_latents.npy", latents)
    out = root / f"{name}.npy"
    argv = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--negative-prompt", negative,
            "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--num-images", str(len(latents)),
            "--init-latents", str(root / f"{name}_latents.npy"), "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return np.load(out)


def check_pixels(name, ours, expected, tolerance: float = PIXEL_TOLERANCE) -> float:
    """Our float32 images against the reference's, within `tolerance` (this module's
    PIXEL_TOLERANCE unless the caller's module sets its own); the max error."""
    assert ours.shape == expected.shape and ours.dtype == np.float32
    assert np.abs(expected - expected.mean()).max() > 0.05, "flat reference images: a weak test"
    error = np.abs(ours - expected).max()
    print(f"{name}: max pixel error {error:.2e}")
    assert error <= tolerance, f"{name}: max pixel error {error:.2e}"
    return error


def _scheduler(pipe, sampler):
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler,
           "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
           "heun": diffusers.HeunDiscreteScheduler}[sampler]
    return cls.from_config(pipe.scheduler.config, clip_sample=False)


# (sampler, negative prompt, extra CLI flags, the same for diffusers)
TXT2IMG = {
    "negative": ("euler", NEGATIVE, [], {}),
    "empty_negative_is_zeros": ("dpmpp_2m", "", [], {}),
    "prompt_2_and_micro_conditioning": (
        "ddim", NEGATIVE,
        ["--prompt-2", "an oil painting", "--negative-prompt-2", "a photo",
         "--original-size", "512", "768", "--crops-coords-top-left", "16", "32",
         "--target-size", "24", "16", "--negative-original-size", "256", "256",
         "--negative-target-size", "32", "32", "--negative-crops-coords-top-left", "4", "0"],
        # (diffusers' txt2img reads negative numbers only when both negative sizes are given)
        dict(prompt_2="an oil painting", negative_prompt_2="a photo", original_size=(512, 768),
             crops_coords_top_left=(16, 32), target_size=(24, 16),
             negative_original_size=(256, 256), negative_target_size=(32, 32),
             negative_crops_coords_top_left=(4, 0))),
    # No negative options: the negative numbers are the positive ones, crop included.
    "crop_without_negatives": ("euler", NEGATIVE, ["--crops-coords-top-left", "8", "4"],
                               dict(crops_coords_top_left=(8, 4))),
}


@pytest.mark.parametrize("case", sorted(TXT2IMG))
def test_txt2img_matches_diffusers(sdxl, case):
    base, ckpt, _, _, root = sdxl
    sampler, negative, flags, reference_options = TXT2IMG[case]
    # One image where the negative numbers differ from the positive ones: diffusers' txt2img
    # repeats its [negative, positive] time_ids per image, pairing them with the wrong rows.
    latents = _latents(1, count=1 if "negative_crops_coords_top_left" in reference_options else 2)
    ours = _sample_cli(root, ckpt, f"txt2img_{case}", latents, "--sampler", sampler, *flags,
                       negative=negative)
    base.scheduler = _scheduler(base, sampler)
    expected = base(PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, num_images_per_prompt=len(latents),
                    latents=torch.from_numpy(latents), output_type="np",
                    **reference_options).images
    check_pixels(case, ours, expected)


def our_noise(monkeypatch, pipe, latents) -> None:
    """diffusers' img2img draws its noise from its generator: give it ours (and the mode)."""
    module = sys.modules[type(pipe).__module__]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(latents))
    _posterior_mode(monkeypatch, pipe)


def right_half_inpaint(root, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a random uint8 image, a mask repainting its right half), saved in `root` as
    inpaint_init.png and inpaint_mask.png (what --init-image and --mask read)."""
    from PIL import Image

    image = (np.random.default_rng(seed).uniform(size=(size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    Image.fromarray(image).save(root / "inpaint_init.png")
    Image.fromarray(mask).save(root / "inpaint_mask.png")
    return image, mask


def _posterior_mode(monkeypatch, pipe) -> None:
    """diffusers encodes images with a posterior sample from its generator; ours with the mode."""
    module = sys.modules[type(pipe).__module__]
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None,
                        sample_mode="sample": original(output, sample_mode="argmax"))


def _image(root, name, seed):
    image = (np.random.default_rng(seed).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / f"{name}.png")
    return image


def test_img2img_matches_diffusers(sdxl, monkeypatch):
    base, ckpt, _, _, root = sdxl
    image = _image(root, "img2img_init", 3)
    latents = _latents(2)
    ours = _sample_cli(root, ckpt, "img2img", latents, "--sampler", "euler",
                       "--init-image", str(root / "img2img_init.png"), "--strength", "0.6",
                       "--crops-coords-top-left", "8", "4")
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components)
    img2img.scheduler = _scheduler(base, "euler")
    our_noise(monkeypatch, img2img, latents)
    expected = img2img(PROMPT, image=Image.fromarray(image), negative_prompt=NEGATIVE,
                       strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       crops_coords_top_left=(8, 4), output_type="np").images
    check_pixels("img2img", ours, expected)


def test_inpaint_matches_diffusers(sdxl, monkeypatch):
    base, ckpt, _, _, root = sdxl
    image = _image(root, "inpaint_init", 4)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 - 3:] = 255  # the seam is off the latent grid
    Image.fromarray(mask).save(root / "inpaint_mask.png")
    latents = _latents(5)
    ours = _sample_cli(root, ckpt, "inpaint", latents, "--sampler", "euler",
                       "--init-image", str(root / "inpaint_init.png"),
                       "--mask", str(root / "inpaint_mask.png"))
    inpaint = diffusers.StableDiffusionXLInpaintPipeline(**base.components)
    inpaint.scheduler = _scheduler(base, "euler")
    _posterior_mode(monkeypatch, inpaint)
    expected = inpaint(PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                       negative_prompt=NEGATIVE, strength=1.0, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                       latents=torch.from_numpy(latents), output_type="np").images
    check_pixels("inpaint", ours, expected)


def test_refiner_img2img_matches_diffusers(sdxl, monkeypatch):
    _, _, refiner, refiner_ckpt, root = sdxl
    image = _image(root, "refiner_init", 6)
    latents = _latents(7)
    ours = _sample_cli(root, refiner_ckpt, "refiner", latents, "--sampler", "euler",
                       "--init-image", str(root / "refiner_init.png"), "--strength", "0.4",
                       "--aesthetic-score", "7", "--negative-aesthetic-score", "2")
    refiner.scheduler = _scheduler(refiner, "euler")
    our_noise(monkeypatch, refiner, latents)
    expected = refiner(PROMPT, image=Image.fromarray(image), negative_prompt=NEGATIVE,
                       strength=0.4, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       aesthetic_score=7.0, negative_aesthetic_score=2.0,
                       output_type="np").images
    check_pixels("refiner img2img", ours, expected)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_base_and_refiner_ensemble_matches_diffusers(sdxl, sampler):
    """diffusers' recipe: the base with denoising_end and output_type="latent", the refiner
    with denoising_start on those latents."""
    base, ckpt, refiner, refiner_ckpt, root = sdxl
    latents = _latents(8)
    ours = _sample_cli(root, ckpt, f"ensemble_{sampler}", latents, "--sampler", sampler,
                       "--steps", "10", "--refiner", str(refiner_ckpt), "--denoising-end", "0.7")
    base.scheduler, refiner.scheduler = _scheduler(base, sampler), _scheduler(refiner, sampler)
    options = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=GUIDANCE)
    handed_over = base(PROMPT, denoising_end=0.7, latents=torch.from_numpy(latents),
                       output_type="latent", **options).images
    expected = refiner(PROMPT, image=handed_over, denoising_start=0.7, output_type="np",
                       **options).images
    check_pixels(f"base + refiner ({sampler})", ours, expected)
    if sampler == "euler":  # the Python API runs the same two programs (cached on disk)
        base_pipe, refiner_pipe = pipeline.load(ckpt), pipeline.load(refiner_ckpt)
        handed = base_pipe.txt2img(PROMPT, NEGATIVE, sampler=sampler, steps=10,
                                   guidance=GUIDANCE, init_latents=latents, denoising_end=0.7,
                                   output_type="latents")
        assert handed.shape == (1, SIZE // 2, SIZE // 2, 4)
        images = refiner_pipe.refine(PROMPT, handed, NEGATIVE, denoising_start=0.7,
                                     sampler=sampler, steps=10, guidance=GUIDANCE,
                                     output_type="float32")
        np.testing.assert_array_equal(images, ours)


@pytest.mark.parametrize("argv, needles", [
    (["--refiner", "REF", "--init-image", "x.png"], ["--refiner runs txt2img"]),
    (["--denoising-end", "0.8"], ["--denoising-end needs --refiner"]),
    (["--refiner", "REF", "--denoising-end", "1.5"], ["--denoising-end 1.5", "(0, 1)"]),
])
def test_ensemble_flags_are_checked_before_loading(capsys, tmp_path, argv, needles):
    argv = [a.replace("REF", str(tmp_path / "missing")) for a in argv]
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x",
                     "--out", str(tmp_path / "x.png"), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_options_a_model_does_not_read_are_refused(sdxl):
    _, ckpt, _, refiner_ckpt, _ = sdxl
    base = pipeline.StableDiffusion(None, pipeline.checkpoint.read_config(
        *pipeline.checkpoint.resolve(ckpt)), export_programs=False)
    refiner = pipeline.StableDiffusion(None, pipeline.checkpoint.read_config(
        *pipeline.checkpoint.resolve(refiner_ckpt)), export_programs=False)
    with pytest.raises(ValueError, match="aesthetic_score: this checkpoint's unet reads"):
        base.prepare("txt2img", "x", aesthetic_score=6.0)
    with pytest.raises(ValueError, match="target_size: this checkpoint's unet reads"):
        refiner.prepare("txt2img", "x", target_size=(16, 16))
    with pytest.raises(ValueError, match="prompt_2 / negative_prompt_2: this checkpoint has one"):
        refiner.prepare("txt2img", "x", prompt_2="y")
    with pytest.raises(ValueError, match=r"original_size=\(16,\): two integers"):
        base.prepare("txt2img", "x", original_size=(16,))
    with pytest.raises(ValueError, match="start_latents and denoising_start go together"):
        refiner.prepare("img2img", "x", start_latents=np.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="denoising_end=1.2: must be in"):
        base.prepare("txt2img", "x", denoising_end=1.2)


def test_another_vae_folder_replaces_the_checkpoints(sdxl):
    """`--vae DIR` (e.g. the fp16-fix SDXL VAE): decoded with that VAE and its scaling
    factor, as diffusers' `vae=`; and `--dtype bfloat16` stays finite and near float32."""
    base, ckpt, _, _, root = sdxl
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(**{**base.vae.config, "scaling_factor": 0.2,
                                     "force_upcast": False})
    randomize(vae)
    vae.save_pretrained(root / "fp16_fix_vae")
    latents = _latents(11)
    flags = ["--sampler", "euler", "--vae", str(root / "fp16_fix_vae")]
    ours = _sample_cli(root, ckpt, "vae", latents, *flags)
    base.scheduler = _scheduler(base, "euler")
    swapped = diffusers.StableDiffusionXLPipeline(**{**base.components, "vae": vae})
    expected = swapped(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                       output_type="np").images
    check_pixels("--vae", ours, expected)
    bf16 = _sample_cli(root, ckpt, "vae_bf16", latents, *flags, "--dtype", "bfloat16")
    assert np.isfinite(bf16).all() and np.abs(bf16 - ours).max() < 0.1


def test_the_released_sdxl_configs_trace_the_ensemble_at_1024():
    """configs/sdxl_base.py and sdxl_refiner.py through `prepare` and the sampling program,
    abstractly (jax.eval_shape: no weights, no compute): 1024x1024, base to 0.8, refiner on."""
    import functools

    import jax

    from diffusion_jax import generate, system
    from diffusion_jax.config_files import load

    handed = None
    for name in ("sdxl_base", "sdxl_refiner"):
        config = system.checkpoint_config(load(name))
        pipe = pipeline.StableDiffusion(None, config, export_programs=False)
        if handed is None:
            prepared = pipe.prepare("txt2img", "a cat", sampler="euler", steps=30,
                                    denoising_end=0.8, output="latents")
        else:
            prepared = pipe.prepare("img2img", "a cat", sampler="euler", steps=30,
                                    start_latents=np.zeros(handed.shape, np.float32),
                                    denoising_start=0.8)
        out = jax.eval_shape(functools.partial(generate.sample, pipe.models, prepared.program,
                                               prepared.plan),
                             system.param_shapes(pipe.system, config), prepared.inputs)
        handed = out
    assert prepared.plan.num_evaluations == 30 - 23 and out.shape == (1, 1024, 1024, 3)

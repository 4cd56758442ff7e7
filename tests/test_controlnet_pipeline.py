"""`diffusion-jax sample --controlnet` against diffusers' StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline on the same tiny random weights and starting latents
(the tiny pipelines of test_pipeline.py and test_sdxl_pipeline.py, ControlNets made from
their U-Nets by `ControlNetModel.from_unet`)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusion_jax import cli, pipeline  # noqa: E402
import test_sdxl_pipeline as sdxl_test  # noqa: E402
from test_pipeline import (NEGATIVE, PIXEL_TOLERANCE, PROMPT, SIZE, _diffusers_pipeline,  # noqa: E402
                           _latents)
from test_sdxl_pipeline import randomize, sdxl  # noqa: E402,F401  (the tiny SDXL fixture)


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    """(diffusers ControlNet pipeline, base checkpoint, ControlNet checkpoint, control image
    path, work dir)."""
    root = tmp_path_factory.mktemp("controlnet_pipeline")
    base = _diffusers_pipeline(root / "tokenizer")
    controlnet = diffusers.ControlNetModel.from_unet(base.unet)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # zero convs and the hint net's conv_out away from zero
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(p[0].numel()))
    base.save_pretrained(root / "sd")
    controlnet.save_pretrained(root / "cn")
    for src, out in (("sd", "ckpt"), ("cn", "cn_ckpt")):
        assert cli.main(["convert", "--from", "diffusers", str(root / src),
                         "--out", str(root / out)]) == 0
    # Not the output's size: both sides resize it (Lanczos) to 32x32.
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "control.png")
    reference = diffusers.StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnet, scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return reference, root / "ckpt", root / "cn_ckpt", root / "control.png", root


@pytest.mark.parametrize("sampler, guess_mode", [("euler", False), ("ddim", True)])
def test_sample_controlnet_matches_diffusers(systems, sampler, guess_mode):
    reference, ckpt, cn_ckpt, image, root = systems
    latents = _latents(5)
    np.save(root / "latents.npy", latents)
    out = root / f"{sampler}_{guess_mode}.npy"
    argv = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--sampler", sampler, "--steps", "5", "--guidance", "7.5",
            "--num-images", "2", "--height", str(SIZE), "--width", str(SIZE),
            "--init-latents", str(root / "latents.npy"), "--controlnet", str(cn_ckpt),
            "--control-image", str(image), "--control-scale", "0.7", "--control-start", "0.2",
            "--control-end", "0.8", "--out", str(out)] + (["--guess-mode"] if guess_mode else [])
    assert cli.main(argv) == 0
    ours = np.load(out)

    scheduler = {"euler": diffusers.EulerDiscreteScheduler,
                 "ddim": diffusers.DDIMScheduler}[sampler]
    reference.scheduler = scheduler.from_config(reference.scheduler.config, clip_sample=False)
    options = dict(negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5,
                   num_images_per_prompt=2, height=SIZE, width=SIZE, output_type="np",
                   guess_mode=guess_mode, control_guidance_start=0.2, control_guidance_end=0.8)
    control = Image.open(image)
    expected = reference(PROMPT, control, latents=torch.from_numpy(latents),
                         controlnet_conditioning_scale=0.7, **options).images
    without = reference(PROMPT, control, latents=torch.from_numpy(latents),
                        controlnet_conditioning_scale=0.0, **options).images
    error = np.abs(ours - expected).max()
    print(f"{sampler} guess_mode={guess_mode}: max pixel error {error:.2e}, the ControlNet "
          f"moves pixels by {np.abs(expected - without).max():.2e}")
    assert np.abs(expected - without).max() > 20 * PIXEL_TOLERANCE  # it steers the images
    assert error <= PIXEL_TOLERANCE


def test_img2img_controlnet_matches_diffusers(systems, monkeypatch):
    """img2img with a ControlNet vs StableDiffusionControlNetImg2ImgPipeline, given our noise
    and the posterior mode (as test_pipeline's img2img test does)."""
    reference, ckpt, cn_ckpt, image, root = systems
    init = (np.random.default_rng(4).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(init).save(root / "init.png")
    latents = _latents(6, count=1)
    np.save(root / "img2img_latents.npy", latents)
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--negative-prompt",
                     NEGATIVE, "--sampler", "ddim", "--steps", "5", "--guidance", "7.5",
                     "--init-image", str(root / "init.png"), "--strength", "0.6",
                     "--init-latents", str(root / "img2img_latents.npy"), "--controlnet",
                     str(cn_ckpt), "--control-image", str(image), "--control-scale", "0.8",
                     "--out", str(root / "img2img.npy")]) == 0
    ours = np.load(root / "img2img.npy")

    img2img = diffusers.StableDiffusionControlNetImg2ImgPipeline(**reference.components)
    img2img.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config,
                                                            clip_sample=False)
    module = sys.modules[type(img2img).__module__]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: torch.from_numpy(latents))
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None,
                        sample_mode="sample": original(output, sample_mode="argmax"))
    expected = img2img(PROMPT, image=Image.fromarray(init), control_image=Image.open(image),
                       negative_prompt=NEGATIVE, strength=0.6, num_inference_steps=5,
                       guidance_scale=7.5, controlnet_conditioning_scale=0.8,
                       height=SIZE, width=SIZE, output_type="np").images
    error = np.abs(ours - expected).max()
    print(f"img2img with ControlNet: max pixel error {error:.2e}")
    assert error <= PIXEL_TOLERANCE


def test_control_options_errors(systems):
    _, ckpt, cn_ckpt, image, _ = systems
    pipe = pipeline.load(ckpt, cache_dir=None)
    with pytest.raises(ValueError, match="has no ControlNet"):
        pipe.prepare("txt2img", PROMPT, control_image=image)
    controlled = pipeline.load(ckpt, controlnet=cn_ckpt, cache_dir=None)
    with pytest.raises(ValueError, match="pass its control_image"):
        controlled.prepare("txt2img", PROMPT, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        controlled.prepare("txt2img", PROMPT, control_image=image, control_start=0.5,
                           control_end=0.5)
    with pytest.raises(ValueError, match="sample with the base"):
        pipeline.load(cn_ckpt, cache_dir=None)


def test_sdxl_controlnet_matches_diffusers(sdxl, systems):
    """An SDXL ControlNet (text_time, from the tiny SDXL base's U-Net; a 2x hint net as the
    tiny VAE is 2x) vs StableDiffusionXLControlNetPipeline; refused with an SD base."""
    base, base_ckpt, _, _, root = sdxl
    controlnet = diffusers.ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(11)
    randomize(controlnet)
    with torch.no_grad():  # zero convs strong enough to move the tiny model's pixels
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.mul_(30)
    controlnet.save_pretrained(root / "cn_xl")
    assert cli.main(["convert", "--from", "diffusers", str(root / "cn_xl"),
                     "--out", str(root / "cn_xl_ckpt")]) == 0
    with pytest.raises(ValueError, match="does not fit .* addition_embed_type"):
        pipeline.load(systems[1], controlnet=root / "cn_xl_ckpt", cache_dir=None)
    size = sdxl_test.SIZE
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "control_xl.png")
    latents = sdxl_test._latents(7)
    ours = sdxl_test._sample_cli(root, base_ckpt, "controlnet_xl", latents, "--sampler", "euler",
                                 "--controlnet", str(root / "cn_xl_ckpt"), "--control-image",
                                 str(root / "control_xl.png"), "--control-scale", "0.6")
    reference = diffusers.StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
        controlnet=controlnet, scheduler=sdxl_test._scheduler(base, "euler"),
        add_watermarker=False)
    options = dict(negative_prompt=sdxl_test.NEGATIVE, num_inference_steps=sdxl_test.STEPS,
                   guidance_scale=sdxl_test.GUIDANCE, height=size, width=size, output_type="np")
    control = Image.open(root / "control_xl.png")
    expected = reference(sdxl_test.PROMPT, image=control, latents=torch.from_numpy(latents),
                         controlnet_conditioning_scale=0.6, **options).images
    without = reference(sdxl_test.PROMPT, image=control, latents=torch.from_numpy(latents),
                        controlnet_conditioning_scale=0.0, **options).images
    error = np.abs(ours - expected).max()
    print(f"SDXL ControlNet: max pixel error {error:.2e}, the ControlNet moves pixels by "
          f"{np.abs(expected - without).max():.2e}")
    # The tiny SDXL decodes to nearly flat images, so the ControlNet moves them little, but
    # 10x beyond the tolerance of the SDXL pipeline tests, which the error keeps to.
    assert np.abs(expected - without).max() > 10 * sdxl_test.PIXEL_TOLERANCE
    assert error <= sdxl_test.PIXEL_TOLERANCE

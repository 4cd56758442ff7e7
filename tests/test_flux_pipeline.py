"""Flux.1 as a whole system: conversion of a FluxPipeline folder both ways and
`diffusion-jax sample --init-latents` against diffusers' FluxPipeline on a tiny random one:
dev's embedded guidance, true CFG against a negative prompt, the image-size shift of the
schedule (FluxPipeline's sigmas), T5's prompt_2, img2img and inpaint."""

import numpy as np
import pytest

from diffusion_jax import cli, system
from diffusion_jax.configs import t5 as t5_configs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.tokenizer import CLIPTokenizer  # noqa: E402
from test_sdxl_pipeline import check_pixels, our_noise, randomize, right_half_inpaint  # noqa: E402
from test_t5 import unigram_vocab  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SIZE = 32  # 16x16 latents (the tiny VAE downsamples 2x): 8x8 packed tokens
STEPS, GUIDANCE, T5_TOKENS = 6, 3.5, 32
PIXEL_TOLERANCE = 2e-3  # the bound
GROUP = pytest.mark.xdist_group("flux_pipeline")



@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(diffusers FluxPipeline (dev-shaped: guidance embeddings), our checkpoint, work dir)."""
    root = tmp_path_factory.mktemp("flux_pipeline")
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=SIZE, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=49408, max_position_embeddings=77))
    t5 = transformers.T5EncoderModel(transformers.T5Config(**dict(
        t5_configs.t5_xxl(), vocab_size=80, d_model=32, d_kv=8, d_ff=64, num_layers=2,
        num_heads=2)))
    randomize(vae, clip, t5)
    randomize(transformer, scale=0.3)  # so that prompts move the pixels well past 2e-3
    CLIPTokenizer.bundled().save_pretrained(root / "tokenizer")
    transformers.T5Tokenizer(vocab=unigram_vocab(), extra_ids=10).save_pretrained(
        root / "tokenizer_2")
    pipe = diffusers.FluxPipeline(
        transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers")
    assert cli.main(["convert", "--from", "diffusers", str(root / "diffusers"),
                     "--out", str(root / "ckpt")]) == 0
    return pipe, root / "ckpt", root


def _state_dicts(pipe) -> dict:
    return {name: {k: v.detach().numpy() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}


@GROUP
def test_convert_then_export_gives_back_the_same_pipeline(flux):
    from diffusion_jax import checkpoint

    pipe, ckpt, root = flux
    config = checkpoint.read_config(ckpt)
    assert system.from_config(config) == system.FLUX
    assert config["schedule"]["use_dynamic_shifting"] and config["tokenizer_2"]["max_length"] == 512
    assert cli.main(["export", "--checkpoint", str(ckpt), "--to", "diffusers",
                     "--out", str(root / "exported")]) == 0
    again = diffusers.FluxPipeline.from_pretrained(root / "exported")
    assert again.scheduler.config.use_dynamic_shifting
    ours, theirs = _state_dicts(again), _state_dicts(pipe)
    for name, state in theirs.items():
        assert sorted(ours[name]) == sorted(state), name
        for key, value in state.items():
            np.testing.assert_array_equal(ours[name][key], value, err_msg=f"{name}.{key}")


def _latents(seed: int, count: int = 1) -> np.ndarray:
    """FluxPipeline's noise before packing, [N, 16, H/f, W/f] (what --init-latents takes)."""
    shape = (count, 16, SIZE // 2, SIZE // 2)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _packed(latents: np.ndarray) -> "torch.Tensor":
    n, c, h, w = latents.shape
    return diffusers.FluxPipeline._pack_latents(torch.from_numpy(latents), n, c, h, w)


def _sample_cli(root, ckpt, name, latents, *extra):
    np.save(root / f"{name}_latents.npy", latents)
    out = root / f"{name}.npy"
    argv = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--sampler", "flow_euler",
            "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--height", str(SIZE),
            "--width", str(SIZE), "--max-sequence-length", str(T5_TOKENS),
            "--num-images", str(len(latents)), "--init-latents", str(root / f"{name}_latents.npy"),
            "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return np.load(out)


def _reference(pipe, latents, **options):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                width=SIZE, max_sequence_length=T5_TOKENS, latents=_packed(latents),
                output_type="np", **options).images




@GROUP
def test_txt2img_with_dev_guidance_matches_diffusers(flux):
    """Embedded guidance 3.5, no negative pass; T5 reads --prompt-2."""
    pipe, ckpt, root = flux
    latents = _latents(1)
    ours = _sample_cli(root, ckpt, "txt2img", latents, "--prompt-2", "an oil painting")
    expected = _reference(pipe, latents, prompt_2="an oil painting")
    error = check_pixels("txt2img", ours, expected, PIXEL_TOLERANCE)
    # The T5 prompt and the guidance each move diffusers' pixels past the tolerance and far
    # past our error (observed 5e-3 and more vs 2e-7), so the match means reading them.
    moved = lambda other: np.abs(other - expected).max()
    assert moved(_reference(pipe, latents)) > max(PIXEL_TOLERANCE, 100 * error)
    other_guidance = pipe(PROMPT, prompt_2="an oil painting", num_inference_steps=STEPS,
                          guidance_scale=1.5, height=SIZE, width=SIZE,
                          max_sequence_length=T5_TOKENS, latents=_packed(latents),
                          output_type="np").images
    assert moved(other_guidance) > max(PIXEL_TOLERANCE, 100 * error)


@GROUP
def test_true_cfg_with_a_negative_prompt_matches_diffusers(flux):
    pipe, ckpt, root = flux
    latents = _latents(2, count=2)
    ours = _sample_cli(root, ckpt, "true_cfg", latents, "--negative-prompt", NEGATIVE,
                       "--true-cfg", "4.0")
    expected = _reference(pipe, latents, negative_prompt=NEGATIVE, true_cfg_scale=4.0,
                          num_images_per_prompt=2)
    check_pixels("true_cfg", ours, expected, PIXEL_TOLERANCE)


@GROUP
def test_flux_options_are_refused_elsewhere_and_checked(flux, capsys):
    _, ckpt, root = flux
    np.save(root / "bad.npy", _latents(0))
    base = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--steps", "1",
            "--init-latents", str(root / "bad.npy"), "--height", str(SIZE), "--width", str(SIZE),
            "--out", str(root / "bad.png")]
    assert cli.main([*base, "--true-cfg", "0.5"]) == 1
    assert "true_cfg=0.5: must be >= 1" in capsys.readouterr().err


@GROUP
def test_img2img_matches_diffusers(flux, monkeypatch):
    """FluxImg2ImgPipeline at strength 0.6: the image's latents noised to the first kept
    sigma. Its noise comes from its generator and its image latents from a posterior sample:
    it is given our noise and the posterior mode we encode with."""
    from PIL import Image

    pipe, ckpt, root = flux
    image = (np.random.default_rng(3).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "img2img_init.png")
    latents = _latents(4)
    ours = _sample_cli(root, ckpt, "img2img", latents, "--init-image",
                       str(root / "img2img_init.png"), "--strength", "0.6")
    img2img = diffusers.FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    our_noise(monkeypatch, img2img, latents)
    expected = img2img(PROMPT, image=Image.fromarray(image), strength=0.6,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                       width=SIZE, max_sequence_length=T5_TOKENS, output_type="np").images
    check_pixels("img2img", ours, expected, PIXEL_TOLERANCE)


def test_inpaint_matches_diffusers(flux, monkeypatch):
    """FluxInpaintPipeline at strength 0.8, the right half repainted: latent blending (its
    transformer reads the 16 packed channels alone), the unmasked half kept on the image's
    path noised to each next sigma. Given our noise and the posterior mode, as img2img."""
    from PIL import Image

    pipe, ckpt, root = flux
    image, mask = right_half_inpaint(root, SIZE, seed=5)
    latents = _latents(6)
    ours = _sample_cli(root, ckpt, "inpaint", latents, "--init-image",
                       str(root / "inpaint_init.png"), "--mask", str(root / "inpaint_mask.png"),
                       "--strength", "0.8")
    inpaint = diffusers.FluxInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    our_noise(monkeypatch, inpaint, latents)
    expected = inpaint(PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                       strength=0.8, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       height=SIZE, width=SIZE, max_sequence_length=T5_TOKENS,
                       output_type="np").images
    check_pixels("inpaint", ours, expected, PIXEL_TOLERANCE)


@GROUP
def test_the_readme_flux_commands_run(flux, tmp_path, monkeypatch, capsys):
    """README.md's Flux.1 block as written, on the tiny pipeline's folder, its default image
    size (FluxPipeline's 1024 px) shrunk to 32x32."""
    import re
    import shlex
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"### Flux\.1\n\n```bash\n(.*?)```", readme, re.S)[1]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    assert [c[1] for c in commands] == ["params", "convert", "convert"] + ["sample"] * 4
    from diffusion_jax.models import flux as flux_model

    monkeypatch.setattr(flux_model.FluxConfig, "sample_size", SIZE // 2)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    Image.fromarray(mask).save(tmp_path / "door_mask.png")
    import safetensors.numpy

    pipe = flux[0]
    safetensors.numpy.save_file(bfl_state_dict(
        {k: v.detach().numpy() for k, v in pipe.transformer.state_dict().items()},
        pipe.transformer.config), tmp_path / "flux1-dev.safetensors")
    folder = str(flux[2] / "diffusers")
    for words in commands:
        assert cli.main([folder if w == "path/to/FLUX.1-dev" else w for w in words[1:]]) == 0, words
    assert "transformer      11,901,408,320" in capsys.readouterr().out
    for name in ("lighthouse.png", "cfg.png", "lighthouse_2.png", "door.png"):
        assert Image.open(tmp_path / name).size == (SIZE, SIZE)


# ----------------------------------------------------------------------------- BFL single files
# The test's own diffusers -> BFL renaming (the layout of Black Forest Labs' flux1-dev.safetensors),
# checked against diffusers' own BFL -> diffusers converter, which must give the diffusers
# state dict back exactly.

_BFL_NAMES = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_BFL_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
               "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}


def bfl_state_dict(sd: dict, config) -> dict:
    """A diffusers FluxTransformer2DModel state dict (numpy) in BFL's names and fusions."""
    out, leaves = {}, ("weight", "bias")
    for ours, theirs in _BFL_NAMES.items():
        out.update({f"{theirs}.{x}": sd[f"{ours}.{x}"] for x in leaves if f"{ours}.{x}" in sd})
    shift_scale = lambda v: np.concatenate(np.split(v, 2)[::-1])
    out.update({f"final_layer.adaLN_modulation.1.{x}": shift_scale(sd[f"norm_out.linear.{x}"])
                for x in leaves})
    for i in range(config["num_layers"]):
        ours, theirs = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for a, b in _BFL_DOUBLE.items():
            out.update({f"{theirs}{b}.{x}": sd[f"{ours}{a}.{x}"] for x in leaves})
        for stream, proj in (("img", "attn.to_{}"), ("txt", "attn.add_{}_proj")):
            for x in leaves:
                out[f"{theirs}{stream}_attn.qkv.{x}"] = np.concatenate(
                    [sd[f"{ours}{proj.format(c)}.{x}"] for c in "qkv"])
            added = "" if stream == "img" else "added_"
            for c, norm in (("q", "query_norm"), ("k", "key_norm")):
                out[f"{theirs}{stream}_attn.norm.{norm}.scale"] = sd[f"{ours}attn.norm_{added}{c}.weight"]
    for i in range(config["num_single_layers"]):
        ours, theirs = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for x in leaves:
            out[f"{theirs}linear1.{x}"] = np.concatenate(
                [sd[f"{ours}{m}.{x}"] for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
            out[f"{theirs}linear2.{x}"] = sd[f"{ours}proj_out.{x}"]
            out[f"{theirs}modulation.lin.{x}"] = sd[f"{ours}norm.linear.{x}"]
        out[f"{theirs}norm.query_norm.scale"] = sd[f"{ours}attn.norm_q.weight"]
        out[f"{theirs}norm.key_norm.scale"] = sd[f"{ours}attn.norm_k.weight"]
    return out


def diffusers_bfl_converter(inner_dim: int):
    """diffusers' BFL -> diffusers converter, its hard-coded Flux.1 width (3072) set to the
    tiny model's."""
    import inspect

    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in source
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def _schnell_shaped(pipe):
    """A transformer the base lacks (a fine-tune): other weights, no guidance embedder."""
    config = dict(pipe.transformer.config, guidance_embeds=False)
    torch.manual_seed(7)
    transformer = diffusers.FluxTransformer2DModel(**{
        k: v for k, v in config.items() if not k.startswith("_")})
    randomize(transformer, scale=0.3)
    return transformer


@GROUP
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_a_bfl_single_file_converts_on_a_diffusers_base(flux, tmp_path, prefix):
    """flux1-*.safetensors (and ComfyUI's prefixed copy) -> convert --base FOLDER: the file's
    transformer, with the architecture its weights show (schnell's: no guidance), and the
    base's VAE, text towers, tokenizers and scheduler; export gives diffusers the same."""
    import safetensors.numpy

    pipe, _, root = flux
    transformer = _schnell_shaped(pipe)
    theirs = {k: v.detach().numpy() for k, v in transformer.state_dict().items()}
    bfl = bfl_state_dict(theirs, transformer.config)
    back = diffusers_bfl_converter(transformer.config.num_attention_heads
                                   * transformer.config.attention_head_dim)(
        {k: torch.from_numpy(v) for k, v in bfl.items()})
    assert sorted(back) == sorted(theirs)
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy(), theirs[key], err_msg=key)

    safetensors.numpy.save_file({prefix + k: v for k, v in bfl.items()}, tmp_path / "flux1.safetensors")
    assert cli.main(["convert", "--from", "single-file", str(tmp_path / "flux1.safetensors"),
                     "--base", str(root / "diffusers"), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                     str(tmp_path / "exported")]) == 0
    again = diffusers.FluxPipeline.from_pretrained(tmp_path / "exported")
    assert again.transformer.config.guidance_embeds is False
    expected = dict(_state_dicts(pipe), transformer=theirs)
    for name, state in _state_dicts(again).items():
        assert sorted(state) == sorted(expected[name]), name
        for key, value in state.items():
            np.testing.assert_array_equal(value, expected[name][key], err_msg=f"{name}.{key}")


@GROUP
def test_bad_bfl_files_are_one_clear_error(flux, tmp_path, capsys):
    import safetensors.numpy

    from test_convert import assert_one_line_error, run_cli

    pipe, _, root = flux
    sd = {k: v.detach().numpy() for k, v in pipe.transformer.state_dict().items()}
    bfl = bfl_state_dict(sd, pipe.transformer.config)
    path = tmp_path / "flux1.safetensors"
    convert = ["convert", "--from", "single-file", path, "--out", tmp_path / "ckpt"]
    safetensors.numpy.save_file(bfl, path)
    assert_one_line_error(*run_cli(capsys, *convert)[::2], "Flux.1 single file",
                          "give --base DIR, a diffusers Flux.1 folder")
    broken = dict(bfl)
    del broken["double_blocks.0.txt_mlp.2.bias"]
    broken["double_blocks.0.img_attn.proj.weight"] = broken["double_blocks.0.img_attn.proj.weight"][:, :4]
    safetensors.numpy.save_file(broken, path)
    assert_one_line_error(*run_cli(capsys, *convert, "--base", root / "diffusers")[::2],
                          "does not match a Flux.1 model", "1 missing key(s): double_blocks.0.txt_mlp.2.bias",
                          "double_blocks.0.img_attn.proj.weight: checkpoint (16, 4)")
    assert not (tmp_path / "ckpt").exists()

"""SD3 / SD3.5 as a whole system: the three text towers' conditioning, the released counts,
conversion of a StableDiffusion3Pipeline folder both ways, `diffusion-jax sample` against
diffusers' SD3 txt2img, img2img and inpaint pipelines, and README.md's SD3 commands."""

import numpy as np
import pytest

from diffusion_jax import cli, system
from diffusion_jax.configs import sd3_medium

CLIP_L, CLIP_G, T5_XXL, VAE = 123_650_304, 694_659_840, 4_762_310_656, 83_819_683


def test_params_prints_every_tower_at_its_released_count(capsys):
    """SD3 Medium's; SD3.5's configs are the same system around the transformers whose
    counts test_mmdit checks."""
    transformer = 2_028_328_000
    assert cli.main(["params", "--config", "sd3_medium"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert printed == {"transformer": f"{transformer:,}", "vae": f"{VAE:,}",
                       "text_encoder": f"{CLIP_L:,}", "text_encoder_2": f"{CLIP_G:,}",
                       "text_encoder_3": f"{T5_XXL:,}",
                       "total": f"{transformer + VAE + CLIP_L + CLIP_G + T5_XXL:,}"}


def test_the_context_is_the_clip_features_padded_then_the_t5_tokens():
    """diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G side by side,
    zero-padded to T5's width, then T5's tokens; pooled = both CLIPs' projections."""
    config = sd3_medium.get_config()
    assert system.from_config(config) == system.SD3
    assert system.context_width(system.SD3, config) == 4096
    assert system.pooled_width(system.SD3, config) == 2048
    rng = np.random.default_rng(0)
    outputs = {name: rng.normal(size=shape).astype(np.float32) for name, shape in
               [("l", (2, 77, 4)), ("g", (2, 77, 6)), ("t5", (2, 5, 16))]}
    joined = system._join_context([[outputs["l"], outputs["g"]], [outputs["t5"]]])
    clip = np.concatenate([outputs["l"], outputs["g"], np.zeros((2, 77, 6))],
                          axis=-1)
    np.testing.assert_array_equal(joined, np.concatenate([clip, outputs["t5"]], axis=1))
    assert [[t.name for t in run] for run in system.context_groups(system.SD3.text_towers)] == [
        ["text_encoder", "text_encoder_2"], ["text_encoder_3"]]


def test_a_context_join_other_than_features_or_sequence_is_refused():
    with pytest.raises(ValueError, match="context_join='tokens'; use one of"):
        system.TextTower("t", "t5", context_join="tokens")


# ----------------------------------------------------------------------------- a tiny SD3

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.config_files import as_dict  # noqa: E402
from diffusion_jax.tokenizer import CLIPTokenizer  # noqa: E402
from test_sdxl_pipeline import check_pixels, our_noise, randomize, right_half_inpaint  # noqa: E402
from test_t5 import unigram_vocab  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SIZE = 16  # 8x8 latents (the tiny VAE downsamples 2x): 4x4 patches
# README.md's SD3 commands' (its samples then reuse these tests' compiled programs).
STEPS, GUIDANCE = 28, 7.0
# The bound: 28 steps at guidance 7 amplify float differences (7.9e-6 here on an idle
# machine, 1.3e-4 once in CI beside the other worker), which the SDXL tests' 1e-4 would fail.
PIXEL_TOLERANCE = 2e-3


def tiny_sd3_config() -> dict:
    """configs/sd3_medium.py's system shrunk to seconds: T5 wider than both CLIPs together
    (48 features padded to 64), as 4096 is wider than 768 + 1280."""
    config = as_dict(sd3_medium.get_config())
    config["transformer"].update(sample_size=8, num_layers=2, num_attention_heads=2,
                                 attention_head_dim=8, joint_attention_dim=64,
                                 caption_projection_dim=16, pooled_projection_dim=8 + 16,
                                 pos_embed_max_size=16)
    config["vae"].update(down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                         norm_num_groups=4, layers_per_block=1, sample_size=16)
    config["text_encoder"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, projection_dim=8)
    config["text_encoder_2"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, projection_dim=16)
    config["text_encoder_3"].update(vocab_size=80, d_model=64, d_kv=8, d_ff=64, num_layers=2,
                                    num_heads=2)
    return config



@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(diffusers pipeline, its folder, our checkpoint converted from it, work dir)."""
    root = tmp_path_factory.mktemp("sd3_pipeline")
    config = tiny_sd3_config()
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(**config["transformer"])
    vae = diffusers.AutoencoderKL(**config["vae"])
    clip_l, clip_g = (transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**config[name])) for name in ("text_encoder", "text_encoder_2"))
    t5 = transformers.T5EncoderModel(transformers.T5Config(**config["text_encoder_3"]))
    randomize(vae, clip_l, clip_g, t5)
    # Larger transformer weights: at 0.1 its attention is near uniform over the 333 text
    # tokens and a prompt moves the pixels by 1e-4 only; at 0.3 by several 1e-2.
    randomize(transformer, scale=0.3)
    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        CLIPTokenizer.bundled(pad_token=config[name]["pad_token"]).save_pretrained(root / name)
        tokenizers[name] = transformers.CLIPTokenizer.from_pretrained(root / name)
    transformers.T5Tokenizer(vocab=unigram_vocab(), extra_ids=10).save_pretrained(
        root / "tokenizer_3")
    tokenizers["tokenizer_3"] = transformers.AutoTokenizer.from_pretrained(root / "tokenizer_3")
    assert len(tokenizers["tokenizer_3"]) <= config["text_encoder_3"]["vocab_size"]
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=clip_l, text_encoder_2=clip_g,
        text_encoder_3=t5, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        **tokenizers)
    pipe.save_pretrained(root / "diffusers")
    assert cli.main(["convert", "--from", "diffusers", str(root / "diffusers"),
                     "--out", str(root / "ckpt")]) == 0
    return pipe, root / "diffusers", root / "ckpt", root


def _state_dicts(pipe) -> dict:
    return {name: {k: v.detach().numpy() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}


@pytest.mark.xdist_group("sd3_pipeline")
def test_convert_then_export_gives_back_the_same_pipeline(sd3):
    """convert reads the StableDiffusion3Pipeline folder (T5 tower, its tokenizer, the flow
    scheduler) and export writes one diffusers loads with the same weights and tokens."""
    from diffusion_jax import checkpoint

    pipe, _, ckpt, root = sd3
    config = checkpoint.read_config(ckpt)
    assert system.from_config(config) == system.SD3
    assert config["schedule"]["shift"] == 3.0 and config["tokenizer_3"]["max_length"] == 256
    pads = [config[name]["pad_token"] for name in ("tokenizer", "tokenizer_2")]
    assert pads == ["<|endoftext|>", "!"]
    assert cli.main(["export", "--checkpoint", str(ckpt), "--to", "diffusers",
                     "--out", str(root / "exported")]) == 0
    again = diffusers.StableDiffusion3Pipeline.from_pretrained(root / "exported")
    assert isinstance(again.scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert again.scheduler.config.shift == 3.0
    ours, theirs = _state_dicts(again), _state_dicts(pipe)
    for name, state in theirs.items():
        # The buffers diffusers recomputes (pos_embed), the tied T5 embedding: same values.
        assert sorted(ours[name]) == sorted(state), name
        for key, value in state.items():
            np.testing.assert_array_equal(ours[name][key], value, err_msg=f"{name}.{key}")
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        ids = lambda p: getattr(p, name)([PROMPT, ""], padding="max_length", max_length=77,
                                         truncation=True)["input_ids"]
        assert ids(again) == ids(pipe), name


# ----------------------------------------------------------------------------- sampling


def _latents(seed: int, count: int = 1) -> np.ndarray:
    shape = (count, 16, SIZE // 2, SIZE // 2)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _sample_cli(root, ckpt, name, latents, *extra):
    np.save(root / f"{name}_latents.npy", latents)
    out = root / f"{name}.npy"
    argv = ["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--negative-prompt",
            NEGATIVE, "--sampler", "flow_euler", "--steps", str(STEPS), "--guidance",
            str(GUIDANCE), "--num-images", str(len(latents)),
            "--init-latents", str(root / f"{name}_latents.npy"), "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return np.load(out)




@pytest.mark.xdist_group("sd3_pipeline")
def test_txt2img_matches_diffusers(sd3):
    """SD3's CFG with a negative prompt, prompt_3 for T5 alone, 256 T5 tokens (the default)."""
    pipe, _, ckpt, root = sd3
    latents = _latents(1)
    ours = _sample_cli(root, ckpt, "txt2img", latents, "--prompt-3", "an oil painting")
    expected = pipe(PROMPT, prompt_3="an oil painting", negative_prompt=NEGATIVE,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    num_images_per_prompt=len(latents), latents=torch.from_numpy(latents),
                    output_type="np").images
    check_pixels("txt2img", ours, expected, PIXEL_TOLERANCE)
    # The T5 prompt moves the pixels well past the tolerance (observed 0.02..0.04: the tiny
    # tokenizer's training varies), so matching above means reading it.
    plain = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, num_images_per_prompt=len(latents),
                 latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(plain - expected).max() > 4 * PIXEL_TOLERANCE


@pytest.mark.xdist_group("sd3_pipeline")
def test_img2img_matches_diffusers(sd3, monkeypatch):
    """StableDiffusion3Img2ImgPipeline at strength 0.6, with 128 T5 tokens."""
    from PIL import Image

    pipe, _, ckpt, root = sd3
    image = (np.random.default_rng(3).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "img2img_init.png")
    latents = _latents(2)
    ours = _sample_cli(root, ckpt, "img2img", latents, "--init-image",
                       str(root / "img2img_init.png"), "--strength", "0.6",
                       "--max-sequence-length", "128")
    img2img = diffusers.StableDiffusion3Img2ImgPipeline(**pipe.components)
    our_noise(monkeypatch, img2img, latents)
    expected = img2img(PROMPT, image=Image.fromarray(image), negative_prompt=NEGATIVE,
                       strength=0.6, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       max_sequence_length=128, output_type="np").images
    check_pixels("img2img", ours, expected, PIXEL_TOLERANCE)


@pytest.mark.xdist_group("sd3_pipeline")
def test_sd3_options_are_checked_before_compiling(sd3):
    from diffusion_jax import pipeline
    from diffusion_jax.config_files import load

    pipe = pipeline.load(sd3[2], cache_dir=None)
    for options, message in [
            (dict(max_sequence_length=0), "max_sequence_length=0: must be in 1..512"),
            (dict(max_sequence_length=513), "max_sequence_length=513: must be in 1..512"),
            (dict(prompt_3=["a", "b"]), "2 prompt_3s for 1 prompts")]:
        with pytest.raises(ValueError, match=message):
            pipe.prepare("txt2img", PROMPT, sampler="flow_euler", **options)
    assert pipe.num_compilations == 0
    sd = pipeline.StableDiffusion(None, as_dict(load("tiny")), export_programs=False)
    for options, message in [(dict(prompt_3="x"), "fewer than three text towers"),
                             (dict(max_sequence_length=77), "has no T5 text tower")]:
        with pytest.raises(ValueError, match=message):
            sd.prepare("txt2img", PROMPT, **options)


@pytest.mark.xdist_group("sd3_pipeline")
def test_the_readme_sd3_commands_run(sd3, tmp_path, monkeypatch, capsys):
    """README.md's SD3 block as written, on the tiny pipeline's folder (16x16 images)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"### SD3 and SD3.5\n\n```bash\n(.*?)```", readme, re.S)[1]
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    assert [c[1] for c in commands] == ["params", "convert", "convert", "sample", "sample"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    import safetensors.numpy

    pipe = sd3[0]
    safetensors.numpy.save_file(sai_state_dict(_torch_state(pipe.transformer),
                                               pipe.transformer.config.num_layers),
                                tmp_path / "sd3.5_medium.safetensors")
    for words in commands:
        args = [str(sd3[1]) if w == "path/to/stable-diffusion-3-medium-diffusers" else w
                for w in words[1:]]
        assert cli.main(args) == 0, words
    assert "text_encoder_3    4,762,310,656" in capsys.readouterr().out
    from PIL import Image

    for name in ("lighthouse.png", "lighthouse_2.png"):
        assert Image.open(tmp_path / name).size == (SIZE, SIZE)


@pytest.mark.xdist_group("sd3_pipeline")
def test_inpaint_matches_diffusers(sd3, monkeypatch):
    """StableDiffusion3InpaintPipeline (latent blending: its transformer reads 16 channels)
    at strength 0.8, the right half repainted."""
    from PIL import Image

    pipe, _, ckpt, root = sd3
    image, mask = right_half_inpaint(root, SIZE, seed=4)
    latents = _latents(5)
    ours = _sample_cli(root, ckpt, "inpaint", latents, "--init-image",
                       str(root / "inpaint_init.png"), "--mask", str(root / "inpaint_mask.png"),
                       "--strength", "0.8")
    inpaint = diffusers.StableDiffusion3InpaintPipeline(**pipe.components)
    our_noise(monkeypatch, inpaint, latents)
    theirs = inpaint(PROMPT, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                     negative_prompt=NEGATIVE, strength=0.8, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, output_type="latent").images
    # diffusers' SD3 inpaint decodes latents / scaling_factor without adding shift_factor
    # back (its txt2img and img2img add it); decode its latents as those do.
    vae = pipe.vae.config
    with torch.no_grad():
        decoded = pipe.vae.decode(theirs / vae.scaling_factor + vae.shift_factor).sample
    check_pixels("inpaint", ours, pipe.image_processor.postprocess(decoded, output_type="np"),
                 PIXEL_TOLERANCE)


# ----------------------------------------------------------------------------- Stability's single files
# The test's own diffusers -> Stability renaming (sd3_medium*.safetensors, sd3.5_*.safetensors),
# checked against diffusers' own converter, which must give the diffusers state dict back.

_SAI_NAMES = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
              "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
              "proj_out": "final_layer.linear"}
_SAI_BLOCK = {"norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
              "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
              "attn2.to_out.0": "x_block.attn2.proj", "norm1_context.linear":
              "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
              "ff_context.net.0.proj": "context_block.mlp.fc1",
              "ff_context.net.2": "context_block.mlp.fc2"}
_SAI_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q",
              "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def sai_state_dict(sd: dict, layers: int) -> dict:
    """A diffusers SD3Transformer2DModel state dict (numpy) in Stability's names."""
    shift_scale = lambda v: np.concatenate(np.split(v, 2)[::-1])
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for ours, theirs in _SAI_NAMES.items():
        out.update({f"{theirs}.{x}": sd[f"{ours}.{x}"] for x in ("weight", "bias")})
    out.update({f"final_layer.adaLN_modulation.1.{x}": shift_scale(sd[f"norm_out.linear.{x}"])
                for x in ("weight", "bias")})
    for i in range(layers):
        ours, theirs = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == layers - 1
        for key, value in sd.items():
            if not key.startswith(ours):
                continue
            module, _, leaf = key[len(ours):].rpartition(".")
            if module in _SAI_BLOCK:
                swap = last and module == "norm1_context.linear"
                out[f"{theirs}{_SAI_BLOCK[module]}.{leaf}"] = shift_scale(value) if swap else value
            elif module in _SAI_NORMS:
                out[f"{theirs}{_SAI_NORMS[module]}.{leaf}"] = value
        for fused, projections in (("x_block.attn", "attn.to_{}"),
                                   ("context_block.attn", "attn.add_{}_proj"),
                                   ("x_block.attn2", "attn2.to_{}")):
            for x in ("weight", "bias"):
                parts = [f"{ours}{projections.format(c)}.{x}" for c in "qkv"]
                if parts[0] in sd:
                    out[f"{theirs}{fused}.qkv.{x}"] = np.concatenate([sd[p] for p in parts])
    return out


def _torch_state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.xdist_group("sd3_pipeline")
def test_a_stability_single_file_converts_on_a_diffusers_base(sd3, tmp_path):
    """An all-in-one file (model.diffusion_model.*, first_stage_model.*, CLIP-L and CLIP-G
    under text_encoders.*, no T5, as sd3_medium_incl_clips.safetensors) of an SD3.5
    Medium-shaped transformer (qk norm, dual attention in block 0) on the SD3 base: the
    file's towers with their own weights, the base's T5, tokenizers and scheduler."""
    import copy

    import safetensors.numpy
    from diffusers.loaders import single_file_utils

    from test_single_file import ldm_vae

    pipe, folder, _, root = sd3
    config = dict(tiny_sd3_config()["transformer"], qk_norm="rms_norm", dual_attention_layers=(0,))
    torch.manual_seed(3)
    transformer = diffusers.SD3Transformer2DModel(**config)
    vae, clip_l, clip_g = (copy.deepcopy(m) for m in (pipe.vae, pipe.text_encoder,
                                                      pipe.text_encoder_2))
    randomize(vae, clip_l, clip_g)
    randomize(transformer, scale=0.3)
    theirs = _torch_state(transformer)
    sai = sai_state_dict(theirs, config["num_layers"])
    back = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(v) for k, v in sai.items()})
    assert sorted(back) == sorted(theirs)
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy(), theirs[key], err_msg=key)

    state = {"model.diffusion_model." + k: v for k, v in sai.items()}
    state.update(ldm_vae(_torch_state(vae), pipe.vae.config))
    for name, model in (("clip_l", clip_l), ("clip_g", clip_g)):
        state.update({f"text_encoders.{name}.transformer.{k}": v
                      for k, v in _torch_state(model).items()})
    safetensors.numpy.save_file(state, tmp_path / "sd35.safetensors")
    assert cli.main(["convert", "--from", "single-file", str(tmp_path / "sd35.safetensors"),
                     "--base", str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                     str(tmp_path / "exported")]) == 0
    again = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "exported")
    assert again.transformer.config.qk_norm == "rms_norm"
    assert tuple(again.transformer.config.dual_attention_layers) == (0,)
    expected = dict(_state_dicts(pipe), transformer=theirs, vae=_torch_state(vae),
                    text_encoder=_torch_state(clip_l), text_encoder_2=_torch_state(clip_g))
    for name, state in _state_dicts(again).items():
        assert sorted(state) == sorted(expected[name]), name
        for key, value in state.items():
            np.testing.assert_array_equal(value, expected[name][key], err_msg=f"{name}.{key}")


@pytest.mark.xdist_group("sd3_pipeline")
def test_a_single_file_on_a_base_of_another_family_is_refused(sd3, tmp_path, capsys):
    import safetensors.numpy

    from test_convert import assert_one_line_error, run_cli

    pipe, _, _, root = sd3
    sai = sai_state_dict(_torch_state(pipe.transformer), pipe.transformer.config.num_layers)
    safetensors.numpy.save_file(sai, tmp_path / "sd3.safetensors")
    convert = ["convert", "--from", "single-file", tmp_path / "sd3.safetensors",
               "--out", tmp_path / "ckpt"]
    flux_like = tmp_path / "flux"  # a Flux.1 folder's layout: a transformer beside T5
    for name, config in (("transformer", {}), ("text_encoder_2", {"model_type": "t5"})):
        (flux_like / name).mkdir(parents=True)
        (flux_like / name / "config.json").write_text(__import__("json").dumps(config))
    assert_one_line_error(*run_cli(capsys, *convert, "--base", flux_like)[::2],
                          "is not a diffusers SD3 folder")
    assert_one_line_error(*run_cli(capsys, *convert, "--base", root / "diffusers", "--ema")[::2],
                          "no EMA weights")
    assert cli.main([str(a) for a in convert] + ["--base", str(root / "diffusers")]) == 0

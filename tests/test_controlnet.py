"""ControlNet: residuals vs diffusers' ControlNetModel, the U-Net taking them vs diffusers'
UNet2DConditionModel with down_block_additional_residuals / mid_block_additional_residual,
the released parameter counts, and config errors. Relative error as in test_unet.py."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.convert.torch_params import state_dict_to_params
from diffusion_jax.models import KINDS
from diffusion_jax.models.controlnet import ControlNetConfig, ControlNetModel
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SD 1.x shape: 1x1 conv projections, cross-attention on the two top levels.
SD1_UNET = dict(
    in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=2,
    cross_attention_dim=16, norm_num_groups=8,
)
# SDXL shape: no attention at the top, 1 then 2 transformer blocks, "text_time".
SDXL_UNET = dict(
    in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4),
    cross_attention_dim=24, use_linear_projection=True, transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=12 + 6 * 8, norm_num_groups=8,
)
POOLED = 12
# A small conditioning net: 4x the latent side (two stride-2 stages), not the released 8x.
HINT_CHANNELS = (8, 8, 16)
SHAPE = (2, 8, 12)  # batch, latent height, width
TOKENS = 5


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def randomize(model) -> None:
    """Every param random: the zero convs would otherwise hide any mapping error."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p) if p.ndim == 1 else
                    torch.randn_like(p) / np.sqrt(max(1, p[0].numel())))


def to_ours(model, kind: str, config) -> dict:
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    return jax.tree.map(jnp.asarray, state_dict_to_params(
        state_dict, KINDS[kind].param_shapes(config)))


@functools.lru_cache(maxsize=None)
def controlnet_reference(name: str):
    unet = UNetConfig.from_dict(SD1_UNET if name == "SD1" else SDXL_UNET)
    config = ControlNetConfig.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    model = diffusers.ControlNetModel(**config.to_dict()).eval()
    randomize(model)
    return config, model, to_ours(model, "controlnet", config)


def inputs(config, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, h, w = SHAPE
    f = 2 ** (len(HINT_CHANNELS) - 1)
    return dict(
        sample=rng.standard_normal((b, h, w, config.in_channels), np.float32),
        t=np.array([981.5, 3.0], np.float32),
        context=rng.standard_normal((b, TOKENS, config.cross_attention_dim), np.float32),
        image=rng.uniform(0, 1, (b, h * f, w * f, 3)).astype(np.float32),
        text_embeds=rng.standard_normal((b, POOLED), np.float32),
        time_ids=np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 8, 0, 768, 1024]],
                          np.float32))


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def added_cond(config, x) -> dict | None:
    if config.addition_embed_type != "text_time":
        return None
    return {"text_embeds": torch.from_numpy(x["text_embeds"]),
            "time_ids": torch.from_numpy(x["time_ids"])}


def torch_controlnet(model, config, x, scale, guess_mode):
    with torch.no_grad():
        out = model(nchw(x["sample"]), torch.from_numpy(x["t"]), torch.from_numpy(x["context"]),
                    nchw(x["image"]), conditioning_scale=scale, guess_mode=guess_mode,
                    added_cond_kwargs=added_cond(config, x))
    return [nhwc(r) for r in out.down_block_res_samples], nhwc(out.mid_block_res_sample)


@functools.lru_cache(maxsize=None)
def compiled_controlnet(name: str, guess_mode: bool):
    """One compile per shape; the scale is an argument, so several scales reuse it."""
    config, _, params = controlnet_reference(name)
    model = ControlNetModel(config)
    text_time = config.addition_embed_type == "text_time"

    def fn(params, x, scale):
        return model.apply({"params": params}, x["sample"], x["t"], x["context"], x["image"],
                           scale, x["text_embeds"] if text_time else None,
                           x["time_ids"] if text_time else None, guess_mode)
    x = inputs(config)
    return jax.jit(fn).lower(params, x, 1.0).compile({"xla_backend_optimization_level": 0})


@pytest.mark.parametrize("name, scale, guess_mode", [("SD1", 0.6, True), ("SDXL", 0.75, False)])
def test_residuals_match_diffusers(name, scale, guess_mode):
    config, model, params = controlnet_reference(name)
    x = inputs(config)
    down, mid = compiled_controlnet(name, guess_mode)(params, x, scale)
    ref_down, ref_mid = torch_controlnet(model, config, x, scale, guess_mode)
    assert len(down) == len(ref_down) == config.num_down_residuals
    errors = [relative_error(a, b) for a, b in zip(down, ref_down)] + [relative_error(mid, ref_mid)]
    print(f"{name} scale={scale} guess_mode={guess_mode}: max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-5
    # The control image matters far beyond the tolerance (the hint is not lost).
    other = dict(x, image=x["image"][::-1])
    assert relative_error(torch_controlnet(model, config, other, scale, guess_mode)[1],
                          ref_mid) > 1e-3


@pytest.mark.parametrize("name", ["SD1", "SDXL"])
def test_unet_takes_residuals_as_diffusers(name):
    """Our U-Net with a ControlNet's residuals in the conditioning pytree, vs diffusers'
    UNet2DConditionModel with down_block_additional_residuals / mid_block_additional_residual."""
    from diffusion_jax.models import unet as unet_lib

    config = UNetConfig.from_dict(SD1_UNET if name == "SD1" else SDXL_UNET)
    model = diffusers.UNet2DConditionModel(**config.to_dict()).eval()
    randomize(model)
    params = to_ours(model, "unet", config)
    x = inputs(config)
    cn_config = ControlNetConfig.from_unet(config)
    rng = np.random.default_rng(2)
    skips = jax.eval_shape(lambda p: ControlNetModel(cn_config).apply(
        {"params": p}, x["sample"], 0.0, x["context"],
        np.zeros(SHAPE[:1] + (SHAPE[1] * 8, SHAPE[2] * 8, 3), np.float32),
        1.0, x["text_embeds"], x["time_ids"]), KINDS["controlnet"].param_shapes(cn_config))
    down = tuple(rng.standard_normal(s.shape, np.float32) for s in skips[0])
    mid = rng.standard_normal(skips[1].shape, np.float32)
    cond = {"context": x["context"], "down_residuals": down, "mid_residual": mid}
    if config.addition_embed_type == "text_time":
        cond.update(pooled=x["text_embeds"], time_ids=x["time_ids"])
    ours = jax.jit(functools.partial(unet_lib.denoise, UNet2DConditionModel(config))).lower(
        params, x["sample"], x["t"], cond).compile({"xla_backend_optimization_level": 0})(
        params, x["sample"], x["t"], cond)
    with torch.no_grad():
        ref = model(nchw(x["sample"]), torch.from_numpy(x["t"]), torch.from_numpy(x["context"]),
                    added_cond_kwargs=added_cond(config, x),
                    down_block_additional_residuals=tuple(nchw(r) for r in down),
                    mid_block_additional_residual=nchw(mid)).sample
        plain = model(nchw(x["sample"]), torch.from_numpy(x["t"]),
                      torch.from_numpy(x["context"]), added_cond_kwargs=added_cond(config, x)).sample
    err = relative_error(ours, nhwc(ref))
    print(f"{name} U-Net with residuals: relative error {err:.2e}")
    assert err <= 1e-5
    assert relative_error(nhwc(plain), nhwc(ref)) > 1e-2  # the residuals changed the output


@pytest.mark.parametrize("config_name, expected", [
    ("controlnet_sd15", 361_279_120), ("controlnet_sdxl", 1_251_014_160)])
def test_released_parameter_counts(config_name, expected, capsys):
    """`diffusion-jax params` of the configs: diffusers' ControlNetModel.from_unet of the
    released SD 1.5 and SDXL base U-Nets has these many parameters."""
    from diffusion_jax.cli import main

    main(["params", "--config", config_name])
    rows = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert rows == {"controlnet": f"{expected:,}", "total": f"{expected:,}"}


def test_config_errors():
    with pytest.raises(ValueError, match="mid_block_type"):
        ControlNetConfig.from_dict({"mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(ValueError, match="up_block_types"):
        ControlNetConfig.from_dict({"up_block_types": ["UpBlock2D"]})
    with pytest.raises(ValueError, match="channel_order"):
        ControlNetConfig.from_dict({"controlnet_conditioning_channel_order": "rgba"})
    config, _, params = controlnet_reference("SD1")
    x = inputs(config)
    with pytest.raises(ValueError, match="controlnet_cond must be"):
        ControlNetModel(config).apply({"params": params}, x["sample"], 0, x["context"],
                                      x["image"][:, :-4])



@pytest.mark.parametrize("name", ["SD1", "SDXL"])
def test_params_from_unet_match_diffusers(name):
    """params_from_unet of a random U-Net = diffusers' ControlNetModel.from_unet of it,
    bitwise, on every copied weight; the zero convs and the conditioning embedding's
    conv_out exactly zero; the rest (the conditioning net) random, of the same shapes."""
    from flax import traverse_util

    from diffusion_jax.models.controlnet import params_from_unet

    unet_config = UNetConfig.from_dict(SD1_UNET if name == "SD1" else SDXL_UNET)
    unet = diffusers.UNet2DConditionModel(**unet_config.to_dict()).eval()
    randomize(unet)
    reference = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    config = ControlNetConfig.from_unet(unet_config,
                                        conditioning_embedding_out_channels=HINT_CHANNELS)
    theirs = traverse_util.flatten_dict(to_ours(reference, "controlnet", config), sep="/")
    ours = traverse_util.flatten_dict(params_from_unet(
        to_ours(unet, "unet", unet_config), config, jax.random.key(1)), sep="/")
    assert ours.keys() == theirs.keys()
    copied = ("conv_in/", "time_embedding/", "add_embedding/", "down_blocks_", "mid_block/")
    zero = ("controlnet_down_blocks_", "controlnet_mid_block/",
            "controlnet_cond_embedding/conv_out/")
    assert any(p.startswith("add_embedding/") for p in ours) == (name == "SDXL")
    for path, value in ours.items():
        if path.startswith(copied + zero):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(theirs[path]), path)
        else:
            assert path.startswith("controlnet_cond_embedding/") and value.shape == theirs[
                path].shape, path
    assert all(not np.any(np.asarray(ours[p])) for p in ours if p.startswith(zero))
    assert any(np.any(np.asarray(ours[p])) for p in ours if p.startswith("mid_block/"))


def test_diffusers_folder_round_trip(tmp_path):
    """`convert --from diffusers` of a ControlNetModel folder -> a checkpoint of the
    ControlNet alone -> `export --to diffusers` -> diffusers loads the same weights."""
    from diffusion_jax import checkpoint, system
    from diffusion_jax.cli import main

    config, model, params = controlnet_reference("SDXL")
    model.save_pretrained(tmp_path / "cn")
    main(["convert", "--from", "diffusers", str(tmp_path / "cn"), "--out", str(tmp_path / "ckpt")])
    items, saved, _ = checkpoint.load_models(tmp_path / "ckpt")
    assert system.from_config(saved) == system.CONTROLNET and list(items) == ["controlnet"]
    assert ControlNetConfig.from_dict(saved["controlnet"]) == config
    jax.tree.map(np.testing.assert_array_equal, items["controlnet"], jax.tree.map(np.asarray, params))

    main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--to", "diffusers",
          "--out", str(tmp_path / "back")])
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "back")

    def plain(cfg):
        return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))
    assert plain(back.config) == plain(model.config)
    ref = model.state_dict()
    assert back.state_dict().keys() == ref.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, ref[key]), key


def original_layout_file(model, config, path, prefix: str) -> None:
    """The model's weights under the original ControlNet names (our mapping)."""
    import safetensors.torch

    from diffusion_jax.convert.controlnet_file import controlnet_ldm_key

    state_dict = {prefix + controlnet_ldm_key(k, config): v.contiguous()
                  for k, v in model.state_dict().items()}
    if prefix:  # a v1.0 file carries SD 1.5 beside the ControlNet: left out
        state_dict["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    safetensors.torch.save_file(state_dict, path)


def test_single_file_matches_diffusers_loader(tmp_path):
    """A `control_model.*` file (input_hint_block, zero_convs, middle_block_out) read by
    `convert --from single-file` and by diffusers' `ControlNetModel.from_single_file`: the
    same weights as the model it was written from."""
    from diffusion_jax import convert, system

    # The released hint net, SD 1.x's text width and groups: what the weights do not say
    # (heads, groups) is SD 1.5's.
    unet = dict(SD1_UNET, block_out_channels=(32, 32, 64), norm_num_groups=32,
                cross_attention_dim=768)
    config = ControlNetConfig.from_unet(UNetConfig.from_dict(unet))
    model = diffusers.ControlNetModel(**config.to_dict()).eval()
    randomize(model)
    model.save_pretrained(tmp_path / "cn")
    original_layout_file(model, config, tmp_path / "control_sd15_tiny.safetensors",
                         "control_model.")
    loaded = diffusers.ControlNetModel.from_single_file(
        str(tmp_path / "control_sd15_tiny.safetensors"), config=str(tmp_path / "cn"))
    ref = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ref[key]), key

    items, saved = convert.import_weights("single-file", tmp_path / "control_sd15_tiny.safetensors")
    assert system.from_config(saved) == system.CONTROLNET
    jax.tree.map(np.testing.assert_array_equal, items["controlnet"],
                 jax.tree.map(np.asarray, to_ours(model, "controlnet", config)))
    # Head counts are not in the weights: SD 1.x's 8, the rest as the model.
    assert ControlNetConfig.from_dict(saved["controlnet"]) == ControlNetConfig.from_dict(
        dict(config.to_dict(), attention_head_dim=8))


def test_single_file_sdxl_layout(tmp_path):
    """An SDXL ControlNet without the prefix (label_emb, transformer depths 1 and 2): read
    back with its config given; a config that disagrees with the weights is refused."""
    from diffusion_jax import convert

    config, model, params = controlnet_reference("SDXL")
    original_layout_file(model, config, tmp_path / "cn_xl.safetensors", "")
    items, saved = convert.import_weights("single-file", tmp_path / "cn_xl.safetensors",
                                          config={"controlnet": config.to_dict()})
    assert ControlNetConfig.from_dict(saved["controlnet"]) == config
    jax.tree.map(np.testing.assert_array_equal, items["controlnet"], jax.tree.map(np.asarray, params))
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels"):
        convert.import_weights("single-file", tmp_path / "cn_xl.safetensors", config={
            "controlnet": dict(config.to_dict(), conditioning_embedding_out_channels=(8, 16))})

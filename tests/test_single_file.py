"""Single-file (CompVis / A1111) checkpoints: detection, LDM key mapping, bad files.

The LDM state dicts are built here from tiny random diffusers models by the test's own
renaming (after diffusers' `convert_diffusers_to_original_stable_diffusion.py`), and that
renaming is checked against diffusers' own LDM -> diffusers converters (which must give the
original state dict back exactly). The loader must then produce exactly the params and the
config that the diffusers-folder path produces from the same models.
"""

import json
import re
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

from test_convert import (assert_one_line_error, assert_params_equal_torch,  # noqa: E402
                          assert_trees_equal, run_cli, save_pipeline, tiny_torch_models)

from diffusion_jax import checkpoint  # noqa: E402
from diffusion_jax.convert import diffusers as diffusers_convert  # noqa: E402
from diffusion_jax.convert import single_file  # noqa: E402
from diffusion_jax.convert.torch_params import ConversionError  # noqa: E402

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012, prediction_type="epsilon", timestep_spacing="leading",
                steps_offset=1, set_alpha_to_one=False)
TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=77, layer_norm_eps=1e-5,
            projection_dim=768)
# Tiny SD 1.x / 2.x systems whose unlearnable settings (heads, sample sizes, prediction type,
# padding) are the family defaults, so a file converts with no --config to the same config.
SD1 = dict(
    unet=dict(sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
              up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2,
              block_out_channels=[32, 32, 64], layers_per_block=2, attention_head_dim=8,
              cross_attention_dim=64),
    vae=dict(sample_size=512, down_block_types=["DownEncoderBlock2D"] * 3,
             up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 64],
             layers_per_block=2, latent_channels=4),
    text_encoder=dict(TEXT, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1),
    schedule=SCHEDULE,
    tokenizer=dict(pad_token="<|endoftext|>", max_length=77),
)
SD2 = dict(
    unet=dict(sample_size=96, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[64, 128],
              layers_per_block=1, attention_head_dim=[1, 2], cross_attention_dim=64,
              use_linear_projection=True, upcast_attention=True),
    vae=dict(sample_size=768, down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
             layers_per_block=1, latent_channels=4),
    text_encoder=dict(TEXT, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
    schedule=dict(SCHEDULE, prediction_type="v_prediction"),
    tokenizer=dict(pad_token="!", max_length=77),
)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "posterior_variance", "posterior_mean_coef1")


# ----------------------------------------------------------------------------- LDM renaming
# The test's own diffusers -> LDM renaming, prefix tables as in diffusers' script.

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _rename(state_dict, table, inner=lambda prefix, rest: rest):
    """Replace the longest matching diffusers prefix of each key by its LDM prefix."""
    out = {}
    for key, value in state_dict.items():
        prefix = max((p for p in table if key.startswith(p)), key=len, default="")
        out[table.get(prefix, "") + inner(prefix, key[len(prefix):])] = value
    return out


def ldm_unet(state_dict, config):
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    table = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(lpb):
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (lpb + 1) + j + 1}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (lpb + 1) + j + 1}.1."
        table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op."
        for j in range(lpb + 1):
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (lpb + 1) + j}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (lpb + 1) + j}.1."
        upsampler = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        table[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (lpb + 1) + lpb}.{upsampler}."

    def inner(prefix, rest):
        if "resnets" in prefix:
            for old, new in _RESNET:
                rest = re.sub(rf"^{old}\.", f"{new}.", rest)
        return rest
    return {"model.diffusion_model." + k: v for k, v in _rename(state_dict, table, inner).items()}


def ldm_vae(state_dict, config):
    n = len(config["block_out_channels"])
    table = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        table[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for k in range(2):
            table[f"{part}.mid_block.resnets.{k}."] = f"{part}.mid.block_{k + 1}."
    for i in range(n):
        table[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        table[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
        for j in range(config["layers_per_block"] + 1):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}

    def inner(prefix, rest):
        if "attentions" in prefix:
            name = next(p for p in attention if rest.startswith(p))
            return attention[name] + rest[len(name):]
        return rest.replace("conv_shortcut", "nin_shortcut")
    out = {}
    for key, value in _rename(state_dict, table, inner).items():
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # LDM's 1x1 convs
        out["first_stage_model." + key] = value
    return out


def ldm_openclip(state_dict, hidden, generator):
    """OpenCLIP keys, q/k/v fused, plus what a real SD 2 file carries beyond diffusers' 23
    layers: one more block, the text projection and the logit scale."""
    out = {"token_embedding.weight": state_dict["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state_dict["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state_dict["text_model.final_layer_norm.weight"],
           "ln_final.bias": state_dict["text_model.final_layer_norm.bias"],
           "text_projection": torch.randn(hidden, hidden, generator=generator),
           "logit_scale": torch.tensor(4.6)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    layers = 1 + max(int(k.split(".")[3]) for k in state_dict if ".layers." in k)
    for layer in range(layers + 1):
        src = f"text_model.encoder.layers.{min(layer, layers - 1)}."
        dst = f"transformer.resblocks.{layer}."
        extra = (lambda v: torch.randn(v.shape, generator=generator)) if layer == layers else (lambda v: v)
        for old, new in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{new}.{leaf}"] = extra(state_dict[f"{src}{old}.{leaf}"])
        for leaf in ("weight", "bias"):
            fused = torch.cat([state_dict[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            out[f"{dst}attn.in_proj_{leaf}"] = extra(fused)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def ldm_state_dict(models, config, family):
    """The whole system as an LDM single file would hold it, schedule buffers included."""
    generator = torch.Generator().manual_seed(2)
    text = {"text_model." + k: v for k, v in models["text_encoder"].state_dict().items()}
    if family == "SD 1.x":
        text = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    else:
        text = ldm_openclip(text, config["text_encoder"]["hidden_size"], generator)
    state_dict = {**ldm_unet(models["unet"].state_dict(), config["unet"]),
                  **ldm_vae(models["vae"].state_dict(), config["vae"]), **text}
    state_dict.update({name: torch.rand(1000, generator=generator) for name in SCHEDULE_BUFFERS})
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- fixtures

FAMILIES = {"SD 1.x": SD1, "SD 2.x": SD2}


@pytest.fixture(scope="module", params=list(FAMILIES))
def system(request, tmp_path_factory):
    """(family, config, torch models, LDM state dict, diffusers folder)."""
    family, config = request.param, FAMILIES[request.param]
    models = tiny_torch_models(config, seed=3)
    folder = tmp_path_factory.mktemp("single") / "folder"
    save_pipeline(models, config, folder)
    return family, config, models, ldm_state_dict(models, config, family), folder


def write_single_file(state_dict, path, nest=False):
    if path.suffix == ".safetensors":
        import safetensors.torch
        safetensors.torch.save_file(state_dict, path)
    else:  # a Lightning-style .ckpt: the weights under "state_dict", beside training metadata
        torch.save({"state_dict": state_dict, "global_step": 470000} if nest else state_dict, path)
    return path


def write_config_file(config, path):
    path.write_text(textwrap.dedent(f"""
        import ml_collections

        def get_config():
            return ml_collections.ConfigDict({config!r})
        """))
    return path


# ----------------------------------------------------------------------------- tests


def test_ldm_state_dict_matches_diffusers_own_converters(system):
    family, config, models, ldm, _ = system
    unet = single_file_utils.convert_ldm_unet_checkpoint(ldm, config["unet"])
    vae = single_file_utils.convert_ldm_vae_checkpoint(ldm, config["vae"])
    if family == "SD 1.x":
        text = single_file_utils.convert_ldm_clip_checkpoint(ldm)
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
        assert "embeddings.position_ids" not in models["text_encoder"].state_dict()
    else:
        text = single_file_utils.convert_open_clip_checkpoint(models["text_encoder"], ldm)
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
        # diffusers drops only block 23 (ViT-H); the tiny tower's extra block is layer 2 here.
        dropped = {k for k in text if k.startswith("encoder.layers.2.")} | {"text_projection.weight"}
        assert len(dropped) == 17
        text = {k: v for k, v in text.items() if k not in dropped}
    for name, converted in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        original = models[name].state_dict()
        assert sorted(converted) == sorted(original), name
        for key, value in original.items():
            assert torch.equal(converted[key].reshape(value.shape), value), (name, key)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_like_the_diffusers_folder(system, tmp_path, suffix):
    family, config, models, ldm, folder = system
    path = write_single_file(ldm, tmp_path / f"model{suffix}", nest=True)
    expected_items, expected_config = diffusers_convert.read_pipeline(folder)

    items, loaded_config = single_file.read_single_file(path)

    assert loaded_config == expected_config  # the family defaults fill the rest
    for name in expected_items:
        assert_trees_equal(items[name], expected_items[name])
    items, loaded_config = single_file.read_single_file(path, config=config)
    assert loaded_config == expected_config
    assert_trees_equal(items["unet"], expected_items["unet"])


def test_convert_command_with_config_file(system, tmp_path, capsys):
    family, config, models, ldm, folder = system
    path = write_single_file(ldm, tmp_path / "model.safetensors")
    config_file = write_config_file(config, tmp_path / "my_config.py")
    rc, out, err = run_cli(capsys, "convert", "--from", "single-file", path, "--config",
                           config_file, "--out", tmp_path / "ckpt")
    assert rc == 0, err
    items, loaded_config = checkpoint.load(tmp_path / "ckpt")
    expected_items, expected_config = diffusers_convert.read_pipeline(folder)
    assert {k: v for k, v in loaded_config.items() if k != "format_version"} == \
        json.loads(json.dumps(expected_config))
    assert_trees_equal(items["text_encoder"], expected_items["text_encoder"])


def test_ema_weights_on_request(system, tmp_path):
    family, config, models, ldm, folder = system
    unet = {k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    with_ema = {**ldm, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
                **{"model_ema." + k[len("model."):].replace(".", ""): v + 1.0 for k, v in unet.items()}}
    path = write_single_file(with_ema, tmp_path / "ema.safetensors")

    raw, _ = single_file.read_single_file(path)
    ema, _ = single_file.read_single_file(path, use_ema=True)

    expected = {k: v.numpy() for k, v in models["unet"].state_dict().items()}
    assert_params_equal_torch(raw["unet"], expected)
    assert_params_equal_torch(ema["unet"], {k: v + np.float32(1.0) for k, v in expected.items()})
    assert_trees_equal(ema["vae"], raw["vae"])
    with pytest.raises(ConversionError, match="no EMA weights"):
        single_file.read_single_file(write_single_file(ldm, tmp_path / "plain.safetensors"),
                                     use_ema=True)


def test_inpainting_unet_is_detected(system, tmp_path):
    family, config, models, ldm, _ = system
    key = "model.diffusion_model.input_blocks.0.0.weight"
    conv_in = torch.randn(ldm[key].shape[0], 9, 3, 3)
    path = write_single_file({**ldm, key: conv_in}, tmp_path / "inpaint.safetensors")
    items, loaded_config = single_file.read_single_file(path)
    assert loaded_config["unet"]["in_channels"] == 9
    np.testing.assert_array_equal(items["unet"]["conv_in"]["kernel"],
                                  conv_in.numpy().transpose(2, 3, 1, 0))


def _drop_key(ldm):
    key = "first_stage_model.decoder.up.0.block.1.conv1.bias"
    del ldm[key]
    return ["missing key", key]


def _extra_key(ldm):
    ldm["model.diffusion_model.output_blocks.0.9.weight"] = torch.ones(3)
    return ["unexpected key", "model.diffusion_model.output_blocks.0.9.weight"]


def _wrong_shape(ldm):
    key = "model.diffusion_model.output_blocks.1.0.emb_layers.1.weight"
    ldm[key] = ldm[key][:-1]
    return ["shape mismatch", key]


def _sdxl(ldm):
    ldm["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    return ["unknown architecture", "SDXL"]


def _no_unet(ldm):
    for key in [k for k in ldm if k.startswith("model.diffusion_model.")]:
        del ldm[key]
    return ["unknown architecture", "no U-Net weights"]


@pytest.mark.parametrize("corrupt", [_drop_key, _extra_key, _wrong_shape, _sdxl, _no_unet])
def test_bad_single_file_is_one_clear_error(system, tmp_path, capsys, corrupt):
    family, config, models, ldm, folder = system
    ldm = dict(ldm)
    needles = corrupt(ldm)
    path = write_single_file(ldm, tmp_path / "bad.safetensors")
    rc, _, err = run_cli(capsys, "convert", "--from", "single-file", path, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, str(path), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_config_that_disagrees_with_the_weights(system, tmp_path, capsys):
    family, config, models, ldm, folder = system
    path = write_single_file(ldm, tmp_path / "model.safetensors")
    config_file = write_config_file({**config, "unet": {**config["unet"], "in_channels": 9}},
                                    tmp_path / "config.py")
    rc, _, err = run_cli(capsys, "convert", "--from", "single-file", path, "--config",
                         config_file, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "the weights have unet.in_channels=4 but the config says 9")
    assert not (tmp_path / "out").exists()


def test_unsafe_and_broken_files_are_refused(tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": RunsCode()}, unsafe)
    rc, out, err = run_cli(capsys, "convert", "--from", "single-file", unsafe, "--out", tmp_path / "a")
    assert_one_line_error(rc, err, str(unsafe), "never unpickles untrusted checkpoints", "safetensors")
    assert "this must never run" not in out

    import safetensors.numpy
    truncated = tmp_path / "truncated.safetensors"
    safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    rc, _, err = run_cli(capsys, "convert", "--from", "single-file", truncated, "--out", tmp_path / "b")
    assert_one_line_error(rc, err, str(truncated), "truncated or corrupt")

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a zip archive at all")
    rc, _, err = run_cli(capsys, "convert", "--from", "single-file", broken, "--out", tmp_path / "c")
    assert_one_line_error(rc, err, str(broken), "truncated or corrupt")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_bfloat16_file_loads_as_float32(system, tmp_path):
    family, config, models, ldm, folder = system
    path = write_single_file({k: v.to(torch.bfloat16) for k, v in ldm.items()},
                             tmp_path / "bf16.safetensors")
    items, _ = single_file.read_single_file(path)
    rounded = {k: v.to(torch.bfloat16).float().numpy() for k, v in models["vae"].state_dict().items()}
    assert_params_equal_torch(items["vae"], rounded)

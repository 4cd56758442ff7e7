"""diffusers folders -> Flax params -> diffusers folders, against tiny random PyTorch models.

Weights are compared exactly (conversion only moves and transposes numbers), so every
comparison here is `np.array_equal`; model outputs after the round trip are `torch.equal`.
The helpers at the top are shared with test_single_file.py.
"""

import json
import shutil

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusion_jax.configs import tiny  # noqa: E402
from diffusion_jax import checkpoint, cli  # noqa: E402
from diffusion_jax.convert import diffusers as diffusers_convert  # noqa: E402
from diffusion_jax.convert.torch_params import ConversionError, torch_key  # noqa: E402
from diffusion_jax.system import STABLE_DIFFUSION  # noqa: E402
from diffusion_jax.tokenizer import CLIPTokenizer  # noqa: E402

MODEL_NAMES = ("unet", "vae", "text_encoder")


def tiny_config() -> dict:
    config = tiny.get_config().to_dict()
    # Unused by CLIPTextModel; transformers' default (512) would differ from the config's.
    config["text_encoder"]["projection_dim"] = 768
    return config


def tiny_torch_models(config: dict, seed: int = 0) -> dict:
    """The three PyTorch models of `config`, every weight random (norm scales and biases
    included, which the libraries initialise to 1 and 0), in eval mode."""
    torch.manual_seed(seed)
    models = {
        "unet": diffusers.UNet2DConditionModel(**config["unet"]),
        "vae": diffusers.AutoencoderKL(**config["vae"]),
        "text_encoder": transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**config["text_encoder"])),
    }
    with torch.no_grad():
        for model in models.values():
            for param in model.parameters():
                param.copy_(0.1 * torch.randn_like(param))
            model.eval()
    return models


def torch_state_dict(model) -> dict:
    """A model's weights as numpy, keyed as its weights files key them."""
    prefix = "text_model." if isinstance(model, transformers.CLIPTextModel) else ""
    return {prefix + k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}


def save_pipeline(models: dict, config: dict, folder, safe_serialization: bool = True) -> None:
    """A diffusers StableDiffusionPipeline folder, as `save_pretrained` writes it."""
    tokenizer_dir = folder.parent / f"{folder.name}-tokenizer"
    CLIPTokenizer.bundled(pad_token=config["tokenizer"]["pad_token"]).save_pretrained(tokenizer_dir)
    pipeline = diffusers.StableDiffusionPipeline(
        **models, tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=diffusers.PNDMScheduler(**config["schedule"], skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=safe_serialization)


def flax_layout(key: str, value: np.ndarray) -> np.ndarray:
    """Written out independently of torch_params: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and not key.endswith("_embedding.weight"):  # nn.Embedding stays
        return value.T
    return value


def assert_params_equal_torch(params: dict, state_dict: dict, prefix: str = "") -> None:
    flat = traverse_util.flatten_dict(params)
    keys = {torch_key(path, prefix): path for path in flat}
    assert sorted(keys) == sorted(state_dict)
    for key, path in keys.items():
        expected = flax_layout(key, state_dict[key])
        assert flat[path].dtype == np.float32
        np.testing.assert_array_equal(flat[path], expected, err_msg=key)


def assert_trees_equal(a: dict, b: dict) -> None:
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg="/".join(path))


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusion-jax: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def tiny_models():
    return tiny_torch_models(tiny_config())


@pytest.fixture(scope="module")
def pipeline_folder(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "sd"
    save_pipeline(tiny_models, tiny_config(), folder)
    return folder


def _expected_configs(config: dict) -> dict:
    expected = {name: STABLE_DIFFUSION.tower(name).component.config_from_dict(config[name]).to_dict()
                for name in MODEL_NAMES}
    expected["schedule"] = dict(config["schedule"])
    expected["tokenizer"] = dict(config["tokenizer"])
    return expected


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_diffusers_folder_converts_to_the_torch_weights(tiny_models, tmp_path, safe_serialization):
    folder = tmp_path / "sd"
    save_pipeline(tiny_models, tiny_config(), folder, safe_serialization)
    suffix = ".safetensors" if safe_serialization else ".bin"
    assert (folder / "unet" / f"diffusion_pytorch_model{suffix}").is_file()

    items, config = diffusers_convert.read_pipeline(folder)

    for name in MODEL_NAMES:
        assert_params_equal_torch(items[name], torch_state_dict(tiny_models[name]),
                                  STABLE_DIFFUSION.tower(name).component.torch_prefix)
    assert config == _expected_configs(tiny_config())


def test_sharded_fp16_variant_and_legacy_vae_names(tiny_models, tmp_path):
    folder = tmp_path / "sd"
    save_pipeline(tiny_models, tiny_config(), folder)
    # The U-Net as an fp16 variant in shards; the VAE with pre-0.14 attention names.
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny_models["unet"].half().save_pretrained(folder / "unet", variant="fp16", max_shard_size="100KB")
    tiny_models["unet"].float()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    import safetensors.numpy
    vae_sd = safetensors.numpy.load_file(vae_file)
    for new, old in legacy.items():
        for key in [k for k in vae_sd if f"attentions.0.{new}." in k]:
            vae_sd[key.replace(new, old)] = vae_sd.pop(key)
    assert any(".proj_attn." in k for k in vae_sd)
    safetensors.numpy.save_file(vae_sd, vae_file)

    items, _ = diffusers_convert.read_pipeline(folder)

    fp16_weights = {k: v.astype(np.float16).astype(np.float32)
                    for k, v in torch_state_dict(tiny_models["unet"]).items()}
    assert_params_equal_torch(items["unet"], fp16_weights)
    assert_params_equal_torch(items["vae"], torch_state_dict(tiny_models["vae"]))


def test_round_trip_through_the_cli(tiny_models, pipeline_folder, tmp_path, capsys):
    ckpt, exported = tmp_path / "ckpt", tmp_path / "exported"
    rc, out, err = run_cli(capsys, "convert", "--from", "diffusers", pipeline_folder, "--out", ckpt)
    assert rc == 0, err
    assert checkpoint.steps(ckpt) == [0]
    assert checkpoint.item_names(ckpt) == sorted(MODEL_NAMES)
    rc, out, err = run_cli(capsys, "export", "--checkpoint", ckpt, "--to", "diffusers", "--out", exported)
    assert rc == 0, err
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories left behind"

    reloaded = {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(exported / "unet"),
        "vae": diffusers.AutoencoderKL.from_pretrained(exported / "vae"),
        "text_encoder": transformers.CLIPTextModel.from_pretrained(exported / "text_encoder"),
    }
    for name, model in reloaded.items():
        original = tiny_models[name].state_dict()
        assert sorted(model.state_dict()) == sorted(original)
        for key, value in model.state_dict().items():
            assert torch.equal(value, original[key]), (name, key)
        config_of = lambda m: STABLE_DIFFUSION.tower(name).component.config_from_dict(
            m.config.to_dict() if name == "text_encoder"
            else {k: v for k, v in m.config.items() if not k.startswith("_")})
        assert config_of(model) == config_of(tiny_models[name])

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    images = torch.randn(1, 3, 16, 16, generator=generator)
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 4])

    def outputs(models):
        with torch.no_grad():
            return (models["unet"](latents, torch.tensor([10, 500]), context).sample,
                    models["vae"](images, sample_posterior=False).sample,
                    models["text_encoder"](ids).last_hidden_state)

    for a, b in zip(outputs(tiny_models), outputs(reloaded)):
        assert torch.equal(a, b)

    # The folder is a complete pipeline, loadable offline.
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert type(pipeline.scheduler).__name__ == "PNDMScheduler"
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    np.testing.assert_array_equal(
        pipeline.tokenizer(["a cute cat"], padding="max_length", max_length=77).input_ids,
        CLIPTokenizer.bundled()(["a cute cat"]))


def test_export_writes_the_ema_params_by_default(tiny_models, pipeline_folder, tmp_path, capsys):
    """As `sample` does: EMA where the checkpoint has it, --no-ema for the raw params."""
    items, config = diffusers_convert.read_pipeline(pipeline_folder)
    ema = {k: v + 1.0 for k, v in traverse_util.flatten_dict(items["unet"]).items()}
    checkpoint.create(tmp_path / "ckpt", {**items, "unet_ema": traverse_util.unflatten_dict(ema)},
                      config)
    checkpoint.create(tmp_path / "raw", items, config)

    def exports_unet_plus(offset, *argv):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        rc, _, err = run_cli(capsys, "export", *argv, "--out", out)
        assert rc == 0, err
        unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
        return all(torch.equal(unet[k], v + offset)
                   for k, v in tiny_models["unet"].state_dict().items())

    assert exports_unet_plus(1.0, "--checkpoint", tmp_path / "ckpt")
    assert exports_unet_plus(0.0, "--checkpoint", tmp_path / "ckpt" / "0", "--no-ema")
    assert exports_unet_plus(0.0, "--checkpoint", tmp_path / "raw")  # no EMA to prefer


def _rewrite_unet_weights(folder, edit) -> None:
    import safetensors.numpy
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state_dict = safetensors.numpy.load_file(path)
    edit(state_dict)
    safetensors.numpy.save_file(state_dict, path)


def _bad_missing_key(folder):
    _rewrite_unet_weights(folder, lambda sd: sd.pop("mid_block.attentions.0.proj_in.weight"))
    return ["missing key", "mid_block.attentions.0.proj_in.weight"]


def _bad_extra_key(folder):
    _rewrite_unet_weights(folder, lambda sd: sd.update({"mid_block.extra.weight": np.ones(3, np.float32)}))
    return ["unexpected key", "mid_block.extra.weight"]


def _bad_shape(folder):
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 48
    config_path.write_text(json.dumps(config))
    return ["shape mismatch", "attn2.to_k.weight", "(64, 32)", "(64, 48)"]


def _bad_truncated_file(folder):
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return [str(path), "truncated or corrupt"]


def _bad_unsupported_config(folder):
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["addition_embed_type"] = "text_time"
    config_path.write_text(json.dumps(config))
    return [str(config_path), "addition_embed_type"]


def _bad_not_a_pipeline(folder):
    shutil.rmtree(folder / "text_encoder")
    return ["not a Stable Diffusion diffusers folder", "text_encoder"]


@pytest.mark.parametrize("make_bad", [_bad_missing_key, _bad_extra_key, _bad_shape,
                                      _bad_truncated_file, _bad_unsupported_config,
                                      _bad_not_a_pipeline])
def test_bad_diffusers_folder_is_one_clear_error(pipeline_folder, tmp_path, capsys, make_bad):
    folder = tmp_path / "sd"
    shutil.copytree(pipeline_folder, folder)
    needles = make_bad(folder)
    with pytest.raises((ValueError, OSError)):
        diffusers_convert.read_pipeline(folder)
    rc, _, err = run_cli(capsys, "convert", "--from", "diffusers", folder, "--out", tmp_path / "ckpt")
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sd"], "nothing half-written"


def test_missing_key_is_a_conversion_error(pipeline_folder, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(pipeline_folder, folder)
    _bad_missing_key(folder)
    with pytest.raises(ConversionError, match="1 missing key"):
        diffusers_convert.read_pipeline(folder)


def test_outputs_are_never_overwritten(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "convert", "--from", "diffusers", pipeline_folder, "--out", out)
    assert_one_line_error(rc, err, str(out), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    rc, _, err = run_cli(capsys, "export", "--checkpoint", pipeline_folder, "--out", tmp_path / "x")
    assert_one_line_error(rc, err, f"{pipeline_folder} is not a diffusion_jax checkpoint",
                          "diffusion-jax convert")
    assert not (tmp_path / "x").exists()

"""SDXL single files (Stability's SGM layout, as A1111 and ComfyUI keep them): read as the
same params and checkpoint config as the equivalent diffusers folder.

The reference files are made independently of our key mapping, from tiny random diffusers
folders: the base's by diffusers' own diffusers -> SGM script (tests/fixtures/
convert_diffusers_to_original_sdxl.py, run as a user runs it). That script hard-codes the
base's U-Net and reads text_encoder/, so the refiner's file takes the script's VAE and
OpenCLIP conversions and test_single_file's LDM U-Net renaming, and is checked by diffusers'
`from_single_file` loading it back into the folder's weights.
"""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_convert import assert_one_line_error, assert_trees_equal, run_cli  # noqa: E402
from test_single_file import ldm_unet  # noqa: E402

from diffusion_jax import checkpoint, system  # noqa: E402
from diffusion_jax.config_files import as_dict, load  # noqa: E402
from diffusion_jax.convert import diffusers as convert_diffusers  # noqa: E402
from diffusion_jax.convert import single_file  # noqa: E402
from diffusion_jax.convert.torch_params import ConversionError  # noqa: E402
from diffusion_jax.tokenizer import CLIPTokenizer  # noqa: E402

SCRIPT = Path(__file__).parent / "fixtures" / "convert_diffusers_to_original_sdxl.py"
CLIP_L = "conditioner.embedders.0.transformer."


def tiny_config(name: str) -> dict:
    """configs/sdxl_base.py or sdxl_refiner.py shrunk to seconds, keeping what weights cannot
    show at the release's values (64-channel heads, 32 groups, 256-wide time sinusoids), so a
    file converts with no --config to the folder's config."""
    config = as_dict(load(name))
    text = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2)
    config["text_encoder_2"].update(text, projection_dim=32)
    # The VAE keeps four levels and two resnets: the script's VAE map hard-codes them.
    config["vae"].update(block_out_channels=[32, 32, 64, 64])
    if name == "sdxl_base":
        # projection_dim: unused, but the release's config.json says 768 (transformers: 512).
        config["text_encoder"].update(text, hidden_size=64, num_attention_heads=1,
                                      projection_dim=768)
        config["unet"].update(block_out_channels=[64, 128, 128], attention_head_dim=[1, 2, 2],
                              transformer_layers_per_block=[1, 2, 3], cross_attention_dim=64 + 128,
                              projection_class_embeddings_input_dim=32 + 6 * 256)
    else:  # level 0 has no attention: its depth is the release's 4, which no weight shows
        config["unet"].update(block_out_channels=[64, 128, 128, 128],
                              attention_head_dim=[1, 2, 2, 2], cross_attention_dim=128,
                              transformer_layers_per_block=[4, 1, 2, 1],
                              projection_class_embeddings_input_dim=32 + 5 * 256)
    return config


def tiny_pipeline(name: str, folder: Path):
    config = tiny_config(name)
    torch.manual_seed(0)
    models = dict(unet=diffusers.UNet2DConditionModel(**config["unet"]),
                  vae=diffusers.AutoencoderKL(**config["vae"]),
                  text_encoder_2=transformers.CLIPTextModelWithProjection(
                      transformers.CLIPTextConfig(**config["text_encoder_2"])))
    tokenizers = {}
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if tokenizer in config:
            CLIPTokenizer.bundled(pad_token=config[tokenizer]["pad_token"]).save_pretrained(
                folder / tokenizer)
            tokenizers[tokenizer] = transformers.CLIPTokenizer.from_pretrained(folder / tokenizer)
    if name == "sdxl_base":
        models["text_encoder"] = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**config["text_encoder"]))
    with torch.no_grad():
        for model in models.values():
            for param in model.parameters():
                param.copy_(0.1 * torch.randn_like(param))
    scheduler = diffusers.EulerDiscreteScheduler(**{
        k: v for k, v in config["schedule"].items() if k != "set_alpha_to_one"})
    if name == "sdxl_base":
        pipe = diffusers.StableDiffusionXLPipeline(**models, **tokenizers, scheduler=scheduler)
    else:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            **models, **tokenizers, text_encoder=None, tokenizer=None, scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder / "folder")
    return folder / "folder", pipe


def folder_config(folder: Path) -> tuple[dict, dict]:
    """read_pipeline of the folder, less the `rescale_betas_zero_snr: false` that today's
    EulerDiscreteScheduler writes and the release's scheduler_config.json (like a single
    file) leaves out: the same schedule either way."""
    items, config = convert_diffusers.read_pipeline(folder)
    assert config["schedule"].pop("rescale_betas_zero_snr") is False
    return items, config


def script_single_file(folder: Path, out: Path) -> dict:
    """diffusers' script on the base folder, exactly as a user runs it."""
    argv = sys.argv
    sys.argv = [str(SCRIPT), "--model_path", str(folder), "--checkpoint_path", str(out),
                "--use_safetensors"]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
    state_dict = safetensors_torch.load_file(out)
    # transformers 5 saves CLIPTextModel without its `text_model.` level, which the script
    # keeps as it finds it; SGM files (transformers 4's FrozenCLIPEmbedder) have it.
    return {(CLIP_L + "text_model." + k[len(CLIP_L):] if k.startswith(CLIP_L) else k): v
            for k, v in state_dict.items()}


def refiner_single_file(folder: Path, pipe) -> dict:
    """The refiner as SGM stores it: bigG alone as embedder 0 (what the script writes as
    embedder 1 for the base, renamed), the U-Net by the LDM renaming plus label_emb."""
    script = runpy.run_path(str(SCRIPT))  # its functions; __main__ does not run
    bigg = script["convert_openclip_text_enc_state_dict"](pipe.text_encoder_2.state_dict())
    bigg["text_projection"] = bigg.pop("text_projection.weight").T.contiguous()
    unet = ldm_unet(pipe.unet.state_dict(), dict(pipe.unet.config))
    unet = {k.replace(".add_embedding.linear_1.", ".label_emb.0.0.")
             .replace(".add_embedding.linear_2.", ".label_emb.0.2."): v for k, v in unet.items()}
    vae = script["convert_vae_state_dict"](pipe.vae.state_dict())
    return {**unet, **{"first_stage_model." + k: v for k, v in vae.items()},
            **{"conditioner.embedders.0.model." + k: v for k, v in bigg.items()}}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """{name: (diffusers folder, pipeline, single file)} for the base and the refiner."""
    made = {}
    for name in ("sdxl_base", "sdxl_refiner"):
        root = tmp_path_factory.mktemp(name)
        folder, pipe = tiny_pipeline(name, root)
        path = root / "model.safetensors"
        if name == "sdxl_base":
            state_dict = script_single_file(folder, path)
        else:
            state_dict = refiner_single_file(folder, pipe)
        safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
        made[name] = folder, pipe, path
    return made


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_sdxl_single_file_reads_like_its_diffusers_folder(sdxl, name):
    folder, _, path = sdxl[name]
    expected_items, expected_config = folder_config(folder)

    items, config = single_file.read_single_file(path)

    assert config == expected_config  # the release's defaults fill what weights cannot say
    assert system.from_config(config) == (system.SDXL_BASE if name == "sdxl_base"
                                          else system.SDXL_REFINER)
    assert system.time_ids_width(system.from_config(config), config) == (
        6 if name == "sdxl_base" else 5)
    assert config["pipeline"] == {"force_zeros_for_empty_prompt": name == "sdxl_base"}
    assert sorted(items) == sorted(expected_items)
    for item in expected_items:
        assert_trees_equal(items[item], expected_items[item])
    # A config file's sections replace the defaults and are checked against the weights.
    items, config = single_file.read_single_file(path, config=tiny_config(name))
    assert config == expected_config
    assert_trees_equal(items["unet"], expected_items["unet"])


@pytest.mark.parametrize("name", ["sdxl_base", "sdxl_refiner"])
def test_diffusers_from_single_file_agrees(sdxl, name):
    """diffusers' own single-file loader (its architecture from the local folder, nothing
    asked of a hub) gives the folder's weights back from the same file."""
    folder, pipe, path = sdxl[name]
    cls = (diffusers.StableDiffusionXLPipeline if name == "sdxl_base"
           else diffusers.StableDiffusionXLImg2ImgPipeline)
    loaded = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours = getattr(pipe, component)
        if ours is None:
            assert getattr(loaded, component, None) is None
            continue
        theirs = getattr(loaded, component).state_dict()
        for key, value in ours.state_dict().items():
            assert torch.equal(theirs[key], value), (component, key)


def test_a_config_must_agree_with_the_transformer_depths(sdxl):
    path = sdxl["sdxl_base"][2]
    config = tiny_config("sdxl_base")
    # Level 0 has no attention: no weight says its depth, so any value is the config's.
    config["unet"]["transformer_layers_per_block"] = [5, 2, 3]
    _, loaded = single_file.read_single_file(path, config=config)
    assert loaded["unet"]["transformer_layers_per_block"] == (5, 2, 3)
    config["unet"]["transformer_layers_per_block"] = [1, 2, 2]
    with pytest.raises(ConversionError, match=r"the weights have \[None, 2, 3\] transformer "
                                              r"blocks per level .*=\(1, 2, 2\)"):
        single_file.read_single_file(path, config=config)


def test_convert_command_writes_the_sdxl_checkpoint(sdxl, tmp_path, capsys):
    folder, _, path = sdxl["sdxl_base"]
    # As SGM saves a model: its sigma table and OpenCLIP's logit scale besides the weights.
    state_dict = {**safetensors_torch.load_file(path), "denoiser.sigmas": torch.rand(1000),
                  "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6)}
    path = tmp_path / "sgm.safetensors"
    safetensors_torch.save_file(state_dict, path)
    rc, _, err = run_cli(capsys, "convert", "--from", "single-file", path, "--out",
                         tmp_path / "ckpt")
    assert rc == 0, err
    items, config = checkpoint.load(tmp_path / "ckpt")
    expected_items, expected_config = folder_config(folder)
    assert system.from_config(config) == system.SDXL_BASE
    assert config["unet"]["transformer_layers_per_block"] == [1, 2, 3]
    assert_trees_equal(items["text_encoder_2"], expected_items["text_encoder_2"])


def _drop_key(state_dict):
    key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    del state_dict[key]
    return ["missing key", key]


def _wrong_shape(state_dict):
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    state_dict[key] = state_dict[key][:-1]
    return ["shape mismatch", key]


def _wrong_projection(state_dict):
    key = "conditioner.embedders.1.model.text_projection"
    state_dict[key] = state_dict[key][:-1]
    return ["shape mismatch", key, "model expects (128, 32)"]


def _odd_time_ids(state_dict):
    key = "model.diffusion_model.label_emb.0.0.weight"
    state_dict[key] = torch.cat([state_dict[key], state_dict[key][:, :1]], dim=1)
    return ["projection_class_embeddings_input_dim=1569 is not 32 pooled features + 5 or 6",
            "give the unet section with --config"]


def _no_bigg(state_dict):
    for key in [k for k in state_dict if k.startswith("conditioner.embedders.1.")]:
        del state_dict[key]
    return ["unknown architecture", "neither SDXL base's"]


@pytest.mark.parametrize("corrupt", [_drop_key, _wrong_shape, _wrong_projection,
                                     _odd_time_ids, _no_bigg])
def test_bad_sdxl_single_file_is_one_clear_error(sdxl, tmp_path, capsys, corrupt):
    state_dict = safetensors_torch.load_file(sdxl["sdxl_base"][2])
    needles = corrupt(state_dict)
    path = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(state_dict, path)
    rc, _, err = run_cli(capsys, "convert", "--from", "single-file", path, "--out",
                         tmp_path / "out")
    assert_one_line_error(rc, err, str(path), *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, name", [("SDXL base", "sdxl_base"),
                                          ("SDXL refiner", "sdxl_refiner")])
def test_the_released_shapes_infer_the_released_configs(family, name):
    """Inference alone, on key shapes of the full-size models (zero-stride arrays, no
    memory; the keys by our own mapping, which the tests above check): the configs/*.py
    architecture comes back, the refiner's depth as its unet/config.json writes it (4)."""
    config = system.checkpoint_config(load(name))
    layout = single_file.LAYOUTS[family]
    state_dict = {}
    for tower in layout.system.towers:
        tower_config = system.tower_config(tower, config)
        shapes = traverse_util.flatten_dict(tower.component.param_shapes(tower_config))
        sources = single_file._sources(tower.name, tower_config, layout, use_ema=False)
        for path, (key, transform) in sources.items():
            shape = single_file._torch_shape(path, shapes[path].shape)
            shape = (single_file._file_shape(transform, shape) if ".in_proj_" not in key
                     else (3 * shape[0], *shape[1:]))
            state_dict[key] = np.broadcast_to(np.float32(0), shape)
    path = Path(f"{name}.safetensors")
    assert single_file.detect_family(state_dict, path) == family
    inferred = {"unet": single_file.infer_unet(state_dict, path),
                "vae": single_file.infer_vae(state_dict, path)}
    for text in layout.text:
        inferred[text.tower] = single_file.infer_text_encoder(
            state_dict, text, layout.system.tower(text.tower).kind, path)
    for tower in layout.system.towers:
        expected = system.tower_config(tower, config).to_dict()
        if tower.name == "unet" and family == "SDXL refiner":
            expected["transformer_layers_per_block"] = 4
        found = single_file.model_config(tower.name, family, inferred[tower.name], None, path)
        assert found.to_dict() == expected, tower.name

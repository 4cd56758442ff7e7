"""SDXL diffusers folders: read as the SDXL system, and convert -> export round trips that
diffusers and transformers load back to the same outputs."""

import numpy as np
import pytest

from diffusion_jax import checkpoint, system
from diffusion_jax.config_files import as_dict, load
from diffusion_jax.convert import diffusers as convert_diffusers
from diffusion_jax.tokenizer import CLIPTokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_sdxl_config() -> dict:
    """configs/sdxl_bench.py's SDXL structure, shrunk to seconds."""
    config = as_dict(load("sdxl_bench"))
    config["unet"].update(sample_size=8, block_out_channels=[32, 64, 64],
                          attention_head_dim=[1, 2, 2], transformer_layers_per_block=[1, 2, 1],
                          norm_num_groups=8, cross_attention_dim=16 + 32,
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    config["vae"].update(down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                         norm_num_groups=4, layers_per_block=1, sample_size=16)
    config["text_encoder"].update(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2)
    config["text_encoder_2"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, projection_dim=16)
    return config


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    config = tiny_sdxl_config()
    torch.manual_seed(0)
    models = dict(
        unet=diffusers.UNet2DConditionModel(**config["unet"]),
        vae=diffusers.AutoencoderKL(**config["vae"]),
        text_encoder=transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**config["text_encoder"])),
        text_encoder_2=transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**config["text_encoder_2"])))
    with torch.no_grad():
        for model in models.values():
            for param in model.parameters():
                param.copy_(0.1 * torch.randn_like(param))
            model.eval()
    root = tmp_path_factory.mktemp("sdxl")
    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        CLIPTokenizer.bundled(pad_token=config[name]["pad_token"]).save_pretrained(root / name)
        tokenizers[name] = transformers.CLIPTokenizer.from_pretrained(root / name)
    pipe = diffusers.StableDiffusionXLPipeline(
        **models, **tokenizers, scheduler=diffusers.EulerDiscreteScheduler(**{
            k: v for k, v in config["schedule"].items() if k != "set_alpha_to_one"}))
    pipe.save_pretrained(root / "folder")
    return root / "folder", pipe


def test_an_sdxl_folder_reads_as_the_sdxl_system(sdxl_folder):
    folder, pipe = sdxl_folder
    items, config = convert_diffusers.read_pipeline(folder)
    assert system.from_config(config) == system.SDXL_BASE
    assert sorted(items) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert config["tokenizer_2"]["pad_token"] == "!" and config["tokenizer"]["max_length"] == 77
    # The conditioning our towers give on the converted weights is diffusers' prompt
    # embedding: both penultimate layers side by side, and bigG's projected EOS embedding.
    models = system.build(system.SDXL_BASE, config)
    ids = system.text_inputs(system.SDXL_BASE, config)(["a photo of a cat"])
    cond = system.encode_text(models, items, ids)
    with torch.no_grad():
        one = pipe.text_encoder(torch.from_numpy(ids["input_ids"]).long(),
                                output_hidden_states=True)
        two = pipe.text_encoder_2(torch.from_numpy(ids["input_ids_2"]).long(),
                                  output_hidden_states=True)
    context = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1).numpy()
    np.testing.assert_allclose(cond["context"], context, atol=1e-5)
    np.testing.assert_allclose(cond["pooled"], two.text_embeds.numpy(), atol=1e-5)


def test_convert_then_export_loads_back_into_diffusers_unchanged(sdxl_folder, tmp_path):
    folder, pipe = sdxl_folder
    items, config = convert_diffusers.read_pipeline(folder)
    checkpoint.create(tmp_path / "ckpt", items, config)
    convert_diffusers.export_pipeline(tmp_path / "ckpt", tmp_path / "out")
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    assert again.tokenizer_2.pad_token == "!"
    rng = np.random.default_rng(0)
    sample = torch.from_numpy(rng.standard_normal((2, 4, 8, 8), np.float32))
    context = torch.from_numpy(rng.standard_normal((2, 5, 48), np.float32))
    added = {"text_embeds": torch.from_numpy(rng.standard_normal((2, 16), np.float32)),
             "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    ids = torch.from_numpy(system.text_inputs(system.SDXL_BASE, config)(["a dog"])["input_ids"])
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            a = getattr(pipe, name)(ids.long(), output_hidden_states=True)
            b = getattr(again, name)(ids.long(), output_hidden_states=True)
            np.testing.assert_allclose(a.hidden_states[-2], b.hidden_states[-2], atol=1e-6)
        np.testing.assert_allclose(pipe.text_encoder_2(ids.long()).text_embeds,
                                   again.text_encoder_2(ids.long()).text_embeds, atol=1e-6)
        np.testing.assert_allclose(pipe.unet(sample, 10, context, added_cond_kwargs=added).sample,
                                   again.unet(sample, 10, context, added_cond_kwargs=added).sample,
                                   atol=1e-6)
        images = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
        np.testing.assert_allclose(pipe.vae(images).sample, again.vae(images).sample, atol=1e-6)


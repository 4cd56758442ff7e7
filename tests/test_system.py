"""The system description (diffusion_jax/system.py): old checkpoints, and a new family
plugged in through it alone."""

import os

import numpy as np
import pytest

from diffusion_jax import checkpoint, pipeline, system

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
V1_CHECKPOINT = os.path.join(FIXTURES, "v1_checkpoint")


def test_a_checkpoint_written_before_the_system_section_is_stable_diffusion():
    config = checkpoint.read_config(V1_CHECKPOINT)
    assert system.SYSTEM_SECTION not in config
    assert system.from_config(config) == system.STABLE_DIFFUSION
    assert checkpoint.item_names(V1_CHECKPOINT) == ["text_encoder", "unet", "unet_ema", "vae"]


def test_a_checkpoint_written_before_the_system_section_samples_the_same_pixels():
    """tests/fixtures/make_v1_checkpoint.py wrote the checkpoint and these pixels with the code
    of 7d30d76, before the redesign; today's code must read and sample it alike."""
    expected = np.load(os.path.join(FIXTURES, "v1_checkpoint_pixels.npz"))
    pipe = pipeline.load(V1_CHECKPOINT, cache_dir=None)
    assert pipe.source.ema
    txt2img = pipe.txt2img(["a cat", "a dog"], "ugly", sampler="dpmpp_2m", steps=4,
                           guidance=3.0, seed=5, output_type="float32")
    img2img = pipe.img2img("a cat", np.linspace(0, 1, 16 * 16 * 3).reshape(16, 16, 3),
                           strength=0.6, sampler="euler_ancestral", steps=5, seed=1,
                           output_type="float32")
    # The fixture's pixels come from the AVX2 machine (YNNPACK off); AVX-512 compiles the
    # sampling program with YNNPACK (xla_defaults), whose sums round differently (2.3e-6).
    np.testing.assert_allclose(txt2img, expected["txt2img"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(img2img, expected["img2img"], atol=1e-5, rtol=0)


def test_system_round_trips_and_refuses_unknown_kinds_and_repeated_names():
    two_towers = system.System(
        system.Tower("unet", "unet"), system.Tower("vae", "vae"),
        (system.TextTower("text_encoder", "clip_text"),
         system.TextTower("text_encoder_2", "clip_text", tokenizer="tokenizer_2",
                          ids_key="input_ids_2", pooled="pooler_output")))
    assert system.System.from_dict(two_towers.to_dict()) == two_towers
    assert two_towers.cond_keys == ("context", "pooled")
    assert two_towers.config_sections == ("unet", "vae", "text_encoder", "text_encoder_2",
                                          "schedule", "tokenizer", "tokenizer_2")
    bad = two_towers.to_dict()
    bad["denoiser"]["kind"] = "unett"
    with pytest.raises(ValueError, match="unknown model kind"):
        system.System.from_dict(bad)
    bad = two_towers.to_dict()
    bad["text_towers"][1]["name"] = "text_encoder"
    with pytest.raises(ValueError, match="repeat"):
        system.System.from_dict(bad)


# ----------------------------------------------------------------------------- a new family


@pytest.fixture
def toy_family():
    """Registers the toy denoiser kind (tests/toy_family.py): a pooled input beside the
    context, read from a second CLIP tower."""
    from diffusion_jax import models

    component = models.register(models.Component(
        "toy_pooled_denoiser", "toy_family", "ToyDenoiserConfig", "ToyDenoiser"))
    yield component
    del models.KINDS[component.kind]


def _toy_config():
    """configs/tiny_train.py with the U-Net replaced by the toy denoiser (named "denoiser")
    and a second text tower giving the pooled embedding: a new system, described in the
    config alone."""
    from diffusion_jax.config_files import load

    config = load(os.path.join(os.path.dirname(FIXTURES), "..", "configs", "tiny_train.py"))
    towers = system.System(
        denoiser=system.Tower("denoiser", "toy_pooled_denoiser"), vae=system.Tower("vae", "vae"),
        text_towers=(system.TextTower("text_encoder", "clip_text"),
                     system.TextTower("text_encoder_2", "clip_text", tokenizer="tokenizer_2",
                                      ids_key="input_ids_2", pooled="pooler_output")))
    config.system = towers.to_dict()
    del config["unet"]
    config.text_encoder_2 = dict(config.text_encoder.to_dict(), hidden_size=8,
                                 intermediate_size=16)
    config.tokenizer_2 = dict(pad_token="!", max_length=config.tokenizer.max_length)
    config.denoiser = dict(in_channels=4, out_channels=4, context_dim=16 + 8, pooled_dim=8,
                           width=16, sample_size=8, downsampling=1)
    config.training.trainable = (r"denoiser/.*",)
    return config


def test_a_new_family_trains_and_samples_through_the_system_description(toy_family, tmp_path):
    """No pipeline or trainer code names the toy's towers: the checkpoint gets its items, the
    loss and the sampler feed it the pooled embedding of the second tower."""
    from diffusion_jax.training import trainer

    config = _toy_config()
    summary = trainer.train(config, tmp_path / "run")
    assert summary["diffusion_train_step_compilations"] == 1
    assert np.isfinite(summary["diffusion_eval_loss"])
    ckpt = tmp_path / "run" / "checkpoints"
    items = checkpoint.item_names(ckpt)
    assert {"denoiser", "denoiser_ema", "text_encoder", "text_encoder_2", "vae"} <= set(items)
    assert "unet" not in items
    assert system.from_config(checkpoint.read_config(ckpt)) == system.from_config(config)

    pipe = pipeline.load(ckpt, cache_dir=None)
    images = pipe.txt2img(["a photo of a bag", "a photo of a coat"], "", steps=3,
                          guidance=2.0, seed=0, output_type="float32")
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    # The pooled embedding of the second tower reaches the denoiser.
    inputs = pipe.text_inputs(["a photo of a bag"])
    assert set(inputs) == {"input_ids", "input_ids_2"}
    cond = system.encode_text(pipe.models, pipe.params, inputs)
    assert cond["pooled"].shape == (1, 8) and cond["context"].shape[-1] == 24
    x, t = np.ones((1, 8, 8, 4), np.float32), np.array([500])
    unpooled = {**cond, "pooled": np.zeros_like(cond["pooled"])}
    assert not np.allclose(system.denoise(pipe.models, pipe.params, x, t, cond),
                           system.denoise(pipe.models, pipe.params, x, t, unpooled))


# ----------------------------------------------------------------------------- SDXL


@pytest.mark.parametrize("name, counts", [
    ("sdxl_base", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}),
    ("sdxl_refiner", {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840}),
])
def test_sdxl_architectures_count_as_released_and_fit_together(name, counts, capsys):
    from diffusion_jax import cli
    from diffusion_jax.config_files import as_dict, load

    assert cli.main(["params", "--config", name]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert {k: int(v.replace(",", "")) for k, v in printed.items() if k != "total"} == counts
    config = as_dict(load(name))
    towers = system.from_config(config)
    width = system.context_width(towers, config)
    assert width == system.denoiser_config(towers, config).context_dim  # 2048 / 1280
    pooled = sum(system.tower_config(t, config).output_widths[t.pooled]
                 for t in towers.text_towers if t.pooled)
    unet = system.denoiser_config(towers, config)
    numbers = (unet.projection_class_embeddings_input_dim - pooled) // unet.addition_time_embed_dim
    assert numbers == (6 if name == "sdxl_base" else 5)  # sizes + crop (+ target | aesthetic)


def test_time_ids_fn_gives_base_and_refiner_numbers_at_the_training_resolution():
    from diffusion_jax.config_files import as_dict, load

    base, refiner = (as_dict(load(name)) for name in ("sdxl_base", "sdxl_refiner"))
    at_1024 = system.time_ids_fn(system.SDXL_BASE, base, 1024)
    np.testing.assert_array_equal(at_1024((1536, 1024), (64, 0)), [1536, 1024, 64, 0, 1024, 1024])
    scored = system.time_ids_fn(system.SDXL_REFINER, refiner, 1024, aesthetic_score=2.5)
    np.testing.assert_array_equal(scored((768, 1024), (0, 8)), [768, 1024, 0, 8, 2.5])
    assert system.time_ids_fn(system.STABLE_DIFFUSION, as_dict(load("sd15")), 512) is None
    assert system.pooled_width(system.SDXL_BASE, base) == 1280

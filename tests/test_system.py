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
    np.testing.assert_allclose(txt2img, expected["txt2img"], atol=2e-6)
    np.testing.assert_allclose(img2img, expected["img2img"], atol=2e-6)


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

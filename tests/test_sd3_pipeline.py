"""SD3 / SD3.5 as a whole system: the three text towers' conditioning, the released counts,
conversion of a StableDiffusion3Pipeline folder, and sampling against diffusers."""

import numpy as np
import pytest

from diffusion_jax import cli, system
from diffusion_jax.configs import sd3_medium, sd35_large, sd35_medium

CLIP_L, CLIP_G, T5_XXL, VAE = 123_650_304, 694_659_840, 4_762_310_656, 83_819_683


@pytest.mark.parametrize("config_module, transformer", [
    (sd3_medium, 2_028_328_000), (sd35_medium, 2_243_171_520), (sd35_large, 8_056_627_520)])
def test_params_prints_every_tower_at_its_released_count(config_module, transformer, capsys):
    name = config_module.__name__.rsplit(".", 1)[1]
    assert cli.main(["params", "--config", name]) == 0
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

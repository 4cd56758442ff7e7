"""SD3Transformer2DModel (models/mmdit.py) against diffusers' PyTorch model on the same random
weights, SD3 and SD3.5 variants; the released configs' parameter counts.

Error measure: max|ours - reference| / max(1, max|reference|), float32.
"""

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel as ReferenceSD3Transformer

import jax
import jax.numpy as jnp

from diffusion_jax import models
from diffusion_jax.configs import sd3_medium, sd35_large, sd35_medium
from diffusion_jax.convert.torch_params import params_to_state_dict, state_dict_to_params
from diffusion_jax.models import mmdit

# Relative error, fp32. 1e-5 held on the AVX2 and AMD AVX-512 machines; an Intel AVX-512
# (Sapphire Rapids-class) VM gave 2.1e-5 for the sd3 and sd35 variants (CI, session 12).
TOL = 3e-5
COMPONENT = models.KINDS["mmdit"]
# 16 x 16 position grid of 2x2 patches: a 6x10 latent (3x5 patches, non-square) uses an
# off-centre crop of it; sample_size 8 sets the grid's scale (base size 4). More crops are
# checked exactly in test_position_embedding_is_diffusers_buffer.
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
            pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16)
VARIANTS = {
    "sd3": TINY,
    "sd35": dict(TINY, qk_norm="rms_norm", dual_attention_layers=(0,)),  # attn2 in block 0
}
def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def reference_model(config: dict) -> ReferenceSD3Transformer:
    torch.manual_seed(0)
    ref = ReferenceSD3Transformer(**config).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but norms start at 1: perturb all
        for p in ref.parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
            if p.ndim == 1 and p.shape[0] == config["attention_head_dim"]:
                p.add_(1.0)  # RMS norm weights around 1
    return ref


def torch_state_dict(ref) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    d = VARIANTS[request.param]
    ref = reference_model(d)
    config = COMPONENT.config_from_dict(d)
    params = state_dict_to_params(torch_state_dict(ref), COMPONENT.param_shapes(config),
                                  ignore=COMPONENT.torch_ignore,
                                  source="diffusers SD3Transformer2DModel")
    return request.param, ref, config, params


def inputs(height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, 4, height, width)).astype(np.float32)  # NCHW
    context = rng.standard_normal((2, 7, 16)).astype(np.float32)
    pooled = rng.standard_normal((2, 12)).astype(np.float32)
    timestep = np.array([1000.0 * 0.73, 37.5], np.float32)  # sigma * 1000, as the pipeline passes
    return latents, timestep, context, pooled


def test_matches_diffusers(variant):
    name, ref, config, params = variant
    height, width = 6, 10
    latents, timestep, context, pooled = inputs(height, width)
    with torch.no_grad():
        expected = ref(torch.from_numpy(latents), torch.from_numpy(context),
                       torch.from_numpy(pooled), torch.from_numpy(timestep)).sample.numpy()
    model = COMPONENT.build(config)
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(latents.transpose(0, 2, 3, 1)),
                                timestep, context, pooled)
    assert ours.shape == (2, height, width, 4) and ours.dtype == jnp.float32
    err = rel_err(np.asarray(ours).transpose(0, 3, 1, 2), expected)
    print(f"{name} {height}x{width}: rel err {err:.2e}")
    assert err < TOL


def test_bfloat16_denoise_with_remat():
    """The system's denoiser call (cond dict) in bfloat16 compute with remat, on the SD3.5
    variant (every module): float32 out, near the float32 reference. Measured 3.1e-2 (2.4e-2
    with attention_impl="xla"); diffusers' own model cast to bfloat16 is at 1.6e-2 here, these
    random weights being far larger than trained ones."""
    ref = reference_model(VARIANTS["sd35"])
    config = COMPONENT.config_from_dict(VARIANTS["sd35"])
    params = state_dict_to_params(torch_state_dict(ref), COMPONENT.param_shapes(config),
                                  ignore=COMPONENT.torch_ignore)
    latents, timestep, context, pooled = inputs(6, 10, seed=1)
    with torch.no_grad():
        expected = ref(torch.from_numpy(latents), torch.from_numpy(context),
                       torch.from_numpy(pooled), torch.from_numpy(timestep)).sample.numpy()
    model = COMPONENT.build(config, dtype=jnp.bfloat16, remat_policy="nothing_saveable")
    ours = jax.jit(lambda p, x: COMPONENT.denoise(model, p, x, timestep, {
        "context": context, "pooled": pooled}))(params, latents.transpose(0, 2, 3, 1))
    assert ours.dtype == jnp.float32
    assert rel_err(np.asarray(ours).transpose(0, 3, 1, 2), expected) < 5e-2


def test_position_embedding_is_diffusers_buffer(variant):
    """The host-computed table equals the state dict's pos_embed.pos_embed buffer (which is
    not loaded), and each crop diffusers' cropped_pos_embed, non-square and off-centre too."""
    _, ref, config, _ = variant
    grid = config.pos_embed_max_size
    buffer = torch_state_dict(ref)["pos_embed.pos_embed"][0]
    np.testing.assert_array_equal(np.asarray(mmdit.position_embedding(config, grid, grid)), buffer)
    for height, width in [(3, 5), (4, 4), (16, 1)]:
        expected = ref.pos_embed.cropped_pos_embed(2 * height, 2 * width)[0].numpy()
        np.testing.assert_array_equal(
            np.asarray(mmdit.position_embedding(config, height, width)), expected)


def test_params_round_trip_to_the_state_dict(variant):
    _, ref, _, params = variant
    expected = torch_state_dict(ref)
    del expected["pos_embed.pos_embed"]
    ours = params_to_state_dict(params)
    assert sorted(ours) == sorted(expected)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_config_reads_diffusers_config(variant):
    _, ref, config, _ = variant
    assert mmdit.SD3TransformerConfig.from_dict(dict(ref.config)) == config
    assert mmdit.SD3TransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("section, count", [
    (sd3_medium.transformer, 2_028_328_000),
    (sd35_medium.transformer, 2_243_171_520),
    (sd35_large.transformer, 8_056_627_520),
])
def test_released_param_counts(section, count):
    """The released transformers' sizes, without the pos_embed buffer diffusers saves."""
    config = COMPONENT.config_from_dict(section())
    assert models.count_params(COMPONENT.param_shapes(config)) == count


def test_rejects_what_it_cannot_run():
    config = COMPONENT.config_from_dict(TINY)
    model = COMPONENT.build(config)
    params = COMPONENT.param_shapes(config)
    context, pooled = jnp.zeros((1, 7, 16)), jnp.zeros((1, 12))
    run = lambda shape: jax.eval_shape(model.apply, {"params": params}, jnp.zeros(shape),
                                       jnp.zeros((1,)), context, pooled)
    assert run((1, 32, 6, 4)).shape == (1, 32, 6, 4)  # the whole grid's height
    with pytest.raises(ValueError, match="larger than the position grid: at most 32"):
        run((1, 34, 6, 4))
    with pytest.raises(ValueError, match="not a multiple of patch_size=2"):
        run((1, 8, 7, 4))
    with pytest.raises(ValueError, match="caption_projection_dim=32 must equal"):
        COMPONENT.config_from_dict(dict(TINY, caption_projection_dim=32))
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not supported"):
        COMPONENT.config_from_dict(dict(TINY, qk_norm="layer_norm"))

"""The Flux transformer against diffusers' PyTorch FluxTransformer2DModel on the same random
weights (with and without the guidance embedder), FluxPipeline's latent packing and position
ids, and the released parameter counts.

Error measure: max|ours - reference| / max(1, max|reference|), float32.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from flax import traverse_util

from diffusion_jax import models
from diffusion_jax.configs import flux_dev, flux_schnell
from diffusion_jax.convert.torch_params import (params_to_state_dict, state_dict_to_params,
                                                torch_key)
from diffusion_jax.models import flux

TOL = 1e-5
COMPONENT = models.KINDS["flux"]
# One block of each kind, 2 heads x 16 with RoPE widths (4, 6, 6); 16 = 4 latent channels x 2 x 2.
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
BATCH, TEXT_TOKENS = 2, 5
LATENT_H, LATENT_W = 8, 12  # unpacked latent sides: a 4 x 6 token grid


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


@pytest.fixture(scope="module", params=[False, True], ids=["schnell-like", "dev-like"])
def tiny(request):
    """(config, reference, params) for a tiny model without / with guidance embeddings."""
    kwargs = dict(TINY, guidance_embeds=request.param)
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # RMS norm weights off their init of 1, biases off 0
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    config = flux.FluxConfig(**kwargs)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = state_dict_to_params(state_dict, COMPONENT.param_shapes(config),
                                  source="diffusers FluxTransformer2DModel")
    return config, ref, params


def inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(
        latents=f32(BATCH, LATENT_H, LATENT_W, config.in_channels // 4),  # NHWC
        context=f32(BATCH, TEXT_TOKENS, config.joint_attention_dim),
        pooled=f32(BATCH, config.pooled_projection_dim),
        sigma=np.array([0.3, 0.85], np.float32),
        guidance=np.array([3.5, 1.25], np.float32) if config.guidance_embeds else None)


def reference_forward(ref, packed, x, img_ids, txt_ids, timestep):
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        return ref(t(packed), t(x["context"]), t(x["pooled"]), t(timestep), t(img_ids),
                   t(txt_ids), t(x["guidance"])).sample.numpy()


def test_matches_diffusers(tiny):
    config, ref, params = tiny
    x = inputs(config)
    packed = np.asarray(flux.pack_latents(x["latents"]))
    img_ids = flux.latent_image_ids(LATENT_H // 2, LATENT_W // 2)
    # Text ids off zero as well, so that RoPE's first axis is exercised.
    txt_ids = np.random.default_rng(1).integers(0, 7, (TEXT_TOKENS, 3)).astype(np.float32)
    expected = reference_forward(ref, packed, x, img_ids, txt_ids, x["sigma"])
    model = COMPONENT.build(config)
    ours = jax.jit(lambda p, h, c, pooled, t, g: model.apply(
        {"params": p}, h, c, pooled, t, img_ids, txt_ids, g))(
        params, packed, x["context"], x["pooled"], x["sigma"], x["guidance"])
    err = rel_err(ours, expected)
    print("Flux transformer error", err, "guidance_embeds", config.guidance_embeds)
    assert ours.dtype == jnp.float32 and err <= TOL


@pytest.mark.parametrize("tiny", [True], ids=["dev-like"], indirect=True)
def test_denoise_is_the_pipeline_call(tiny):
    """system denoise on NHWC latents at the flow model time 1000 sigma = FluxPipeline's
    transformer call (packed latents, its ids, timestep / 1000) unpacked; cond["guidance"]
    reaches the guidance embedder."""
    config, ref, params = tiny
    x = inputs(config, seed=2)
    nchw = np.ascontiguousarray(x["latents"].transpose(0, 3, 1, 2))
    c = config.in_channels // 4
    packed = FluxPipeline._pack_latents(torch.from_numpy(nchw), BATCH, c, LATENT_H, LATENT_W)
    img_ids = FluxPipeline._prepare_latent_image_ids(BATCH, LATENT_H // 2, LATENT_W // 2,
                                                     "cpu", torch.float32).numpy()
    timesteps = x["sigma"] * np.float32(1000)  # the scheduler's timesteps
    out = reference_forward(ref, packed.numpy(), x, img_ids, np.zeros((TEXT_TOKENS, 3)),
                            timesteps / np.float32(1000))
    expected = FluxPipeline._unpack_latents(torch.from_numpy(out), LATENT_H * 8, LATENT_W * 8, 8)
    cond = {"context": x["context"], "pooled": x["pooled"]}
    if config.guidance_embeds:
        cond["guidance"] = x["guidance"]
    model = COMPONENT.build(config)
    ours = jax.jit(lambda p, lat, t, cond: COMPONENT.denoise(model, p, lat, t, cond))(
        params, x["latents"], timesteps, cond)
    err = rel_err(ours, expected.numpy().transpose(0, 2, 3, 1))
    print("denoise error", err)
    assert err <= TOL


def test_state_dict_round_trip(tiny):
    config, ref, params = tiny
    exported = params_to_state_dict(params)
    reference = ref.state_dict()
    assert set(exported) == set(reference)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, reference[key].numpy(), err_msg=key)


@pytest.mark.parametrize("height, width", [(16, 16), (24, 40), (8, 2)])
def test_packing_and_ids_match_flux_pipeline(height, width):
    latents = np.random.default_rng(0).standard_normal((2, 16, height, width)).astype(np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(latents), 2, 16, height, width).numpy()
    ours = flux.pack_latents(latents.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ours, packed)
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(packed), height * 8, width * 8, 8)
    np.testing.assert_array_equal(flux.unpack_latents(packed, height * 8, width * 8, 8),
                                  unpacked.numpy().transpose(0, 2, 3, 1))
    ids = FluxPipeline._prepare_latent_image_ids(2, height // 2, width // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(flux.latent_image_ids(height // 2, width // 2), ids.numpy())


def test_rope_tables_match_flux_pos_embed():
    ids = np.concatenate([np.zeros((7, 3)), flux.latent_image_ids(64, 64)]).astype(np.float32)
    ids[:7] = np.arange(21).reshape(7, 3)
    cos, sin = diffusers.models.transformers.transformer_flux.FluxPosEmbed(
        theta=10000, axes_dim=[16, 56, 56])(torch.from_numpy(ids))
    ours = flux.rope_tables(ids, (16, 56, 56))
    np.testing.assert_array_equal(ours[0], cos.numpy())
    np.testing.assert_array_equal(ours[1], sin.numpy())


def test_guidance_must_match_the_config(tiny):
    config, _, params = tiny
    x = inputs(config)
    model = COMPONENT.build(config)
    wrong = None if config.guidance_embeds else x["sigma"]
    with pytest.raises(ValueError, match="guidance"):
        model.apply({"params": params}, flux.pack_latents(x["latents"]), x["context"],
                    x["pooled"], x["sigma"], flux.latent_image_ids(4, 6),
                    flux.text_ids(TEXT_TOKENS), wrong)


def test_traced_ids_are_refused(tiny):
    config, _, params = tiny
    x = inputs(config)
    model = COMPONENT.build(config)
    with pytest.raises(TypeError, match="host"):
        jax.jit(lambda ids: model.apply(
            {"params": params}, flux.pack_latents(x["latents"]), x["context"], x["pooled"],
            x["sigma"], ids, flux.text_ids(TEXT_TOKENS), x["guidance"]))(
            flux.latent_image_ids(4, 6))


# FLUX.1-dev's transformer/config.json; schnell's differs in guidance_embeds only.
FLUX_DEV_CONFIG_JSON = {
    "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
    "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
    "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}


@pytest.mark.parametrize("config_module, guidance, count", [
    (flux_dev, True, 11_901_408_320),
    (flux_schnell, False, 11_891_178_560),
])
def test_released_param_counts(config_module, guidance, count, capsys):
    """`diffusion-jax params` of the whole system: the transformer, the Flux VAE, CLIP-L and
    T5-XXL at their released counts."""
    from diffusion_jax import cli

    config = COMPONENT.config_from_dict(config_module.get_config().transformer)
    assert config == flux.FluxConfig.from_dict(dict(FLUX_DEV_CONFIG_JSON,
                                                    guidance_embeds=guidance))
    name = config_module.__name__.rsplit(".", 1)[1]
    assert cli.main(["params", "--config", name]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert printed == {"transformer": f"{count:,}", "vae": "83,819,683",
                       "text_encoder": "123,060,480", "text_encoder_2": "4,762,310,656",
                       "total": f"{count + 83_819_683 + 123_060_480 + 4_762_310_656:,}"}


def test_the_flux_system_reads_pooled_clip_and_t5_context():
    from diffusion_jax import system
    from diffusion_jax.diffusion import flow, process

    config = flux_dev.get_config()
    assert system.from_config(config) == system.FLUX
    assert system.System.from_dict(system.FLUX.to_dict()) == system.FLUX
    assert system.FLUX.cond_keys == ("context", "pooled")
    schedule = process.from_config(config.schedule.to_dict())
    assert isinstance(schedule, flow.FlowProcess) and schedule.config.use_dynamic_shifting


def test_released_layout_maps_by_rename():
    """Every key and shape of FLUX.1-dev's state dict (the model built on the meta device:
    no memory) is one of our params under the mechanical rename, and nothing else is."""
    config = flux.FluxConfig.from_dict(FLUX_DEV_CONFIG_JSON)
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**config.to_dict())
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {torch_key(path): leaf.shape[::-1]  # Linear kernels are transposed
            for path, leaf in traverse_util.flatten_dict(COMPONENT.param_shapes(config)).items()}
    assert ours == expected


def test_from_dict_round_trip_and_unknown_keys():
    config = flux.FluxConfig.from_dict(dict(diffusers.FluxTransformer2DModel(
        **TINY, guidance_embeds=True).config))
    assert config == flux.FluxConfig(**TINY, guidance_embeds=True)
    assert flux.FluxConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="'qk_norm'"):
        flux.FluxConfig.from_dict(dict(TINY, qk_norm="rms_norm"))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux.FluxConfig(**dict(TINY, axes_dims_rope=(4, 6, 8)))

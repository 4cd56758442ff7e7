"""AutoencoderKL against diffusers' PyTorch AutoencoderKL on the same random weights.

Error measure: max|ours - reference| / max(1, max|reference|), float32 unless stated.
"""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax.configs import flux_dev, sd15, sd21, tiny
from diffusion_jax.convert.torch_params import state_dict_to_params
from diffusion_jax.models import vae

TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x.detach() if isinstance(x, torch.Tensor) else x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def models():
    """The tiny config's VAE in PyTorch, every norm and bias perturbed away from its init."""
    config = vae.AutoencoderKLConfig.from_dict(tiny.get_config().vae)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**config.to_dict()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:  # norm scales (init 1), norm and conv biases
                p.add_(0.2 * torch.randn_like(p))
        # Shrink what the first GroupNorms see to a variance near their eps (1e-6), so that a
        # wrong eps (the U-Net's 1e-5) shows in the outputs.
        for conv_in in (ref.encoder.conv_in, ref.decoder.conv_in):
            conv_in.weight.mul_(1e-3)
            conv_in.bias.mul_(1e-3)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    # Fails naming the keys if any parameter is missing, unexpected or misshapen.
    template = jax.eval_shape(vae.init_params, config, jax.random.key(0))
    params = state_dict_to_params(state_dict, template, source="diffusers AutoencoderKL")
    model = vae.AutoencoderKL(config)
    return config, ref, model, params


@functools.cache
def _jitted(model, method_name):
    return jax.jit(lambda params, *a: model.apply({"params": params}, *a,
                                                  method=getattr(model, method_name)))


def images(config, batch=2, side=16, seed=1):
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, config.in_channels))
    return x.astype(np.float32)


def test_encoder_moments_and_mode_match_diffusers(models):
    config, ref, model, params = models
    x = images(config)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(x))).latent_dist
    posterior = _jitted(model, "encode")(params, x)
    assert posterior.mean.shape == (2, 8, 8, config.latent_channels)
    errors = {"mean": rel_err(posterior.mean, nhwc(dist.mean)),
              "logvar": rel_err(posterior.logvar, nhwc(dist.logvar)),
              "mode": rel_err(posterior.mode(), nhwc(dist.mode()))}
    print("encode errors", errors)
    assert max(errors.values()) <= TOL, errors
    assert np.std(posterior.mean) > 0.1  # a real signal, not a collapsed output


def test_decode_matches_diffusers(models):
    config, ref, model, params = models
    z = np.random.default_rng(2).normal(size=(2, 8, 8, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref.decode(torch.from_numpy(nchw(z))).sample)
    decoded = _jitted(model, "decode")(params, z)
    assert decoded.dtype == jnp.float32 and decoded.shape == (2, 16, 16, config.out_channels)
    err = rel_err(decoded, expected)
    print("decode error", err, "output scale", np.max(np.abs(expected)))
    assert err <= TOL


def test_forward_reconstruction_matches_diffusers(models):
    config, ref, model, params = models
    x = images(config, seed=3)
    with torch.no_grad():
        expected = nhwc(ref(torch.from_numpy(nchw(x)), sample_posterior=False).sample)
    reconstruction, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    err = rel_err(reconstruction, expected)
    print("forward (posterior mode) error", err)
    assert err <= TOL


def test_kl_matches_diffusers(models):
    config, ref, model, params = models
    x = images(config, seed=4)
    with torch.no_grad():
        expected = ref.encode(torch.from_numpy(nchw(x))).latent_dist.kl().numpy()
    kl = _jitted(model, "encode")(params, x).kl()
    assert kl.shape == (2,)
    err = rel_err(kl, expected)
    print("kl error", err, "kl", expected)
    assert err <= TOL


def test_sample_is_mean_plus_std_times_noise(models):
    config, ref, model, params = models
    x = images(config, seed=5)
    rng = jax.random.key(7)
    posterior = _jitted(model, "encode")(params, x)
    noise = jax.random.normal(rng, posterior.mean.shape)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(x))).latent_dist
    expected = nhwc(dist.mean + dist.std * torch.from_numpy(np.array(nchw(noise))))
    assert rel_err(posterior.sample(rng), expected) <= TOL
    # The training path decodes that same sample.
    reconstruction, _ = jax.jit(lambda p, x, rng: model.apply(
        {"params": p}, x, sample_posterior=True, rng=rng))(params, x, rng)
    decoded = _jitted(model, "decode")(params, posterior.sample(rng))
    assert rel_err(reconstruction, decoded) <= TOL
    with pytest.raises(ValueError, match="rng"):
        model.apply({"params": params}, x, sample_posterior=True)


def test_logvar_clipping_and_kl_on_extreme_moments():
    moments = np.random.default_rng(6).normal(size=(2, 3, 3, 8)).astype(np.float32)
    moments[..., 4:] *= 40.0  # logvar far outside [-30, 20] on both sides
    ours = vae.DiagonalGaussian.from_moments(jnp.asarray(moments))
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    ref = DiagonalGaussianDistribution(torch.from_numpy(nchw(moments)))
    assert float(ours.logvar.min()) == -30.0 and float(ours.logvar.max()) == 20.0
    assert rel_err(ours.logvar, nhwc(ref.logvar)) == 0.0
    assert rel_err(ours.std, nhwc(ref.std)) <= TOL
    assert rel_err(ours.kl(), ref.kl().numpy()) <= TOL


def test_bf16_decode_close_to_fp32(models):
    config, _, model, params = models
    z = np.random.default_rng(8).normal(size=(1, 8, 8, config.latent_channels)).astype(np.float32)
    fp32 = _jitted(model, "decode")(params, z)
    model_bf16 = vae.AutoencoderKL(config, dtype=jnp.bfloat16)
    bf16 = _jitted(model_bf16, "decode")(params, z)
    assert bf16.dtype == jnp.float32  # outputs are float32 whatever the compute dtype
    err = rel_err(bf16, fp32)
    print("bf16 decode error vs fp32", err)
    assert 0 < err <= 5e-2


def test_activations_past_float16_range_stay_finite_in_bf16_and_upcast_fp16():
    """The SD / SDXL VAEs' decoders reach activations beyond float16's 65504 (black or NaN
    images in fp16 pipelines). Norm scales x30000 put a tiny decoder there: float16 compute
    gives NaN, bfloat16 (float32's exponent range) stays finite and close, and the system
    builds a `force_upcast` VAE in float32 under float16."""
    from flax import traverse_util

    from diffusion_jax import system

    config = vae.AutoencoderKLConfig(block_out_channels=(8, 16), layers_per_block=1,
                                     down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    flat = traverse_util.flatten_dict(vae.init_params(config, jax.random.key(0)))
    flat = {k: v * 30000.0 if k[0] == "decoder" and k[-1] == "scale" else v
            for k, v in flat.items()}
    params = traverse_util.unflatten_dict(flat)
    z = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
    decode = {dtype: vae.decode(vae.AutoencoderKL(config, dtype=dtype), params, z)
              for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)}
    assert float(jnp.abs(decode[jnp.float32]).max()) > 65504  # past float16's range
    assert not jnp.isfinite(decode[jnp.float16]).all()  # the failure being guarded against
    assert jnp.isfinite(decode[jnp.bfloat16]).all()
    assert rel_err(decode[jnp.bfloat16], decode[jnp.float32]) < 2e-2

    sections = dict(system.checkpoint_config(tiny.get_config()), vae=config.to_dict())
    models = system.build(system.STABLE_DIFFUSION, sections, dtype=jnp.float16)
    assert models.vae.dtype == jnp.float32 and models["unet"].dtype == jnp.float16
    upcast = vae.decode(models.vae, params, z)
    np.testing.assert_allclose(upcast, decode[jnp.float32], rtol=1e-5, atol=1e-2)
    fixed = dict(sections, vae=dict(config.to_dict(), force_upcast=False))  # an fp16-fix VAE
    assert system.build(system.STABLE_DIFFUSION, fixed, dtype=jnp.float16).vae.dtype == jnp.float16


def test_sd15_param_count():
    config = vae.AutoencoderKLConfig.from_dict(sd15.get_config().vae)
    shapes = jax.eval_shape(vae.init_params, config, jax.random.key(0))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 83_653_863


def test_flux_vae_param_count():
    config = vae.AutoencoderKLConfig.from_dict(flux_dev.get_config().vae)
    assert config == vae.AutoencoderKLConfig.from_dict(FLUX_CONFIG_JSON)
    shapes = jax.eval_shape(vae.init_params, config, jax.random.key(0))
    assert "quant_conv" not in shapes and "post_quant_conv" not in shapes
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 83_819_683


def test_without_quant_convs_matches_diffusers():
    """Flux's VAE options (16 latent channels, no quant_conv / post_quant_conv) on the tiny
    architecture: encode and decode as diffusers."""
    config = vae.AutoencoderKLConfig.from_dict(dict(
        tiny.get_config().vae, latent_channels=16, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159))
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKL(**config.to_dict()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = state_dict_to_params(state_dict, jax.eval_shape(vae.init_params, config,
                                                             jax.random.key(0)))
    model = vae.AutoencoderKL(config)
    x = images(config, seed=5)
    z = np.random.default_rng(6).normal(size=(2, 8, 8, 16)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(x))).latent_dist
        decoded = nhwc(ref.decode(torch.from_numpy(nchw(z))).sample)
    posterior = vae.encode(model, params, x)
    errors = {"mean": rel_err(posterior.mean, nhwc(dist.mean)),
              "logvar": rel_err(posterior.logvar, nhwc(dist.logvar)),
              "decode": rel_err(vae.decode(model, params, z), decoded)}
    print("no-quant-conv VAE errors", errors)
    assert max(errors.values()) <= TOL, errors


# FLUX.1-dev's vae/config.json (schnell's is the same).
FLUX_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None,
    "latents_std": None, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False, "use_quant_conv": False,
}


# vae/config.json of the released SD 1.5 and SD 2.1 (diffusers 0.6 / 0.8 era: no scaling_factor).
SD15_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_CONFIG_JSON = dict(SD15_CONFIG_JSON, _diffusers_version="0.8.0", sample_size=768,
                        _name_or_path="hf-models/stable-diffusion-v2-768x768/vae")


def test_from_dict_accepts_released_and_current_configs():
    for d in (SD15_CONFIG_JSON, SD21_CONFIG_JSON, sd21.get_config().vae):
        config = vae.AutoencoderKLConfig.from_dict(d)
        assert config.block_out_channels == (128, 256, 512, 512)
        assert config.scaling_factor == 0.18215 and config.downsampling_factor == 8
    # What diffusers 0.42 itself holds, private keys and all.
    current = dict(diffusers.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8,
                                           down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2).config)
    config = vae.AutoencoderKLConfig.from_dict(current)
    assert config.block_out_channels == (32, 64)
    assert vae.AutoencoderKLConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("key, value, supported", [
    ("act_fn", "relu", "'silu'"),
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4, "'DownEncoderBlock2D'"),
    ("up_block_types", ["AttnUpDecoderBlock2D"] * 4, "'UpDecoderBlock2D'"),
    ("mid_block_add_attention", False, "True"),
    ("latents_mean", [0.0] * 4, "None"),
    ("norm_type", "spatial", "supported keys"),
])
def test_from_dict_rejects_unsupported_values(key, value, supported):
    with pytest.raises(ValueError) as excinfo:
        vae.AutoencoderKLConfig.from_dict(dict(SD15_CONFIG_JSON, **{key: value}))
    message = str(excinfo.value)
    assert key in message and supported in message, message

"""The Stable Diffusion VAE: diffusers `AutoencoderKL` (KL-regularised autoencoder, f=8 for SD).

Images are NHWC in [-1, 1]; latents are NHWC and *unscaled* here (multiply by
`config.scaling_factor` before the U-Net, divide after). Submodule names follow diffusers
(`encoder/down_blocks_0/resnets_1/conv2`, `decoder/mid_block/attentions_0/to_q`, ...), so a
diffusers `vae` state dict converts with `convert.torch_params.state_dict_to_params` unprefixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (Attention, Downsample2D, ResnetBlock2D, Upsample2D,
                                         conv, group_norm)

Dtype = Any

# diffusers hard-codes this epsilon for every GroupNorm of the VAE (the U-Net's is 1e-5).
VAE_NORM_EPS = 1e-6

# config.json keys that describe the runtime, not the network's math (as do diffusers' private
# `_class_name`, `_diffusers_version`, ... keys).
_IGNORED_KEYS = frozenset()

# Options this implementation fixes, with their one supported value. The first group are
# config fields (kept so `to_dict` writes a complete diffusers config); the second group are
# per-channel latent statistics of later VAEs that SD 1.x/2.x and Flux leave unset.
_FIXED_FIELDS = {
    "act_fn": "silu",
    "mid_block_add_attention": True,
}
_FIXED_UNMODELLED_KEYS = {"latents_mean": None, "latents_std": None}


def _unsupported(key: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"AutoencoderKL config: {key}={value!r} is not supported; supported: "
                      f"{supported}.")


@jax.tree_util.register_static  # a pytree without leaves: passes through jit / eval_shape
@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config (defaults: the SD 1.x/2.x VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # Flux's: latents = (z - shift_factor) * scaling_factor
    use_quant_conv: bool = True  # the 1x1 conv after the encoder (Flux's VAE has none)
    use_post_quant_conv: bool = True  # the 1x1 conv before the decoder (Flux's: none)
    mid_block_add_attention: bool = True
    sample_size: int = 512  # the training resolution; the network takes any multiple of 2^(n-1)
    # The SD / SDXL VAEs' decoder activations pass float16's 65504: under float16 compute the
    # VAE runs in float32 (`system.build`) unless its weights were fixed for fp16 (False).
    force_upcast: bool = True

    def __post_init__(self):
        for key, supported in _FIXED_FIELDS.items():
            if getattr(self, key) != supported:
                raise _unsupported(key, getattr(self, key), repr(supported))
        for key, block in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if any(t != block for t in types):
                raise _unsupported(key, list(types), f"only {block!r} blocks")
            if len(types) != len(self.block_out_channels):
                raise ValueError(f"AutoencoderKL config: {key} has {len(types)} entries but "
                                 f"block_out_channels has {len(self.block_out_channels)}.")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(f"AutoencoderKL config: block_out_channels {channels} is not "
                                 f"divisible by norm_num_groups={self.norm_num_groups}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """From a diffusers `vae/config.json` dict (or a config section with the same keys)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in _FIXED_UNMODELLED_KEYS:
                if value != _FIXED_UNMODELLED_KEYS[key]:
                    raise _unsupported(key, value, repr(_FIXED_UNMODELLED_KEYS[key]))
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key not in _IGNORED_KEYS and not key.startswith("_"):
                raise ValueError(f"AutoencoderKL config: unknown key {key!r}; supported keys: "
                                 f"{sorted(fields | _IGNORED_KEYS | set(_FIXED_UNMODELLED_KEYS))}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), NHWC, as diffusers'
    `DiagonalGaussianDistribution` (logvar clipped to [-30, 20])."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over the latent's H, W, C: shape [B]."""
        per_element = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.sum(per_element, axis=tuple(range(1, self.mean.ndim)))


def _resnet(out_channels: int, config: AutoencoderKLConfig, name: str, dtype: Dtype):
    return ResnetBlock2D(out_channels, groups=config.norm_num_groups, eps=VAE_NORM_EPS,
                         dtype=dtype, name=name)


class SpatialSelfAttention(nn.Module):
    """diffusers' mid-block `Attention` of the VAE: GroupNorm, one head over all H*W positions
    (head size = channels, biased projections), output projection, residual.

    diffusers keeps `group_norm` and the projections in one module, so the shared `Attention`
    block shares this module's scope: all five sit side by side under `attentions_0`.
    """

    channels: int
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        # Softmax in float32 as diffusers' `upcast_softmax=True`: one head over thousands of
        # positions with 512-wide dot products overflows bf16 logits.
        self.attention = Attention(heads=1, dim_head=self.channels, out_features=self.channels,
                                   qkv_bias=True, upcast=True, dtype=self.dtype)
        nn.share_scope(self, self.attention)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, VAE_NORM_EPS, name="group_norm", dtype=self.dtype)(x)
        y = self.attention(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        return x.astype(y.dtype) + y


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` without a timestep: resnet, attention, resnet."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = self.config.block_out_channels[-1]
        x = _resnet(channels, self.config, "resnets_0", self.dtype)(x)
        x = SpatialSelfAttention(channels, self.config.norm_num_groups, dtype=self.dtype,
                                 name="attentions_0")(x)
        return _resnet(channels, self.config, "resnets_1", self.dtype)(x)


class DownEncoderBlock(nn.Module):
    """diffusers `DownEncoderBlock2D`: resnets, then a stride-2 conv padded (0, 1)."""

    config: AutoencoderKLConfig
    out_channels: int
    num_layers: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = _resnet(self.out_channels, self.config, f"resnets_{j}", self.dtype)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, asymmetric_padding=True, dtype=self.dtype,
                             name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """diffusers `UpDecoderBlock2D`: resnets, then nearest 2x upsampling and a conv."""

    config: AutoencoderKLConfig
    out_channels: int
    num_layers: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = _resnet(self.out_channels, self.config, f"resnets_{j}", self.dtype)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _norm_silu_conv(x: jax.Array, out_channels: int, config: AutoencoderKLConfig,
                    dtype: Dtype) -> jax.Array:
    """The conv_norm_out -> SiLU -> conv_out head both halves end with (inside a compact call)."""
    x = group_norm(config.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", dtype=dtype)(x)
    return conv(out_channels, 3, name="conv_out", dtype=dtype)(nn.silu(x))


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", dtype=self.dtype)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock(cfg, channels, cfg.layers_per_block, add_downsample=i < last,
                                 dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, dtype=self.dtype, name="mid_block")(x)
        return _norm_silu_conv(x, 2 * cfg.latent_channels, cfg, self.dtype)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h*f, w*f, out_channels]."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        x = conv(cfg.block_out_channels[-1], 3, name="conv_in", dtype=self.dtype)(z)
        x = MidBlock(cfg, dtype=self.dtype, name="mid_block")(x)
        reversed_channels = tuple(reversed(cfg.block_out_channels))
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            # The decoder has one resnet more per block than the encoder (as in CompVis' LDM).
            x = UpDecoderBlock(cfg, channels, cfg.layers_per_block + 1, add_upsample=i < last,
                               dtype=self.dtype, name=f"up_blocks_{i}")(x)
        return _norm_silu_conv(x, cfg.out_channels, cfg, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`. `encode` and `decode` are meant for `apply(..., method=...)`.

    Outputs (posterior moments, decoded images) are float32 whatever the compute dtype: they
    are small, and losses, sampling noise and image conversion want the precision.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        identity = lambda x: x
        self.quant_conv = (conv(2 * cfg.latent_channels, 1, name="quant_conv", dtype=self.dtype)
                           if cfg.use_quant_conv else identity)
        self.post_quant_conv = (conv(cfg.latent_channels, 1, name="post_quant_conv",
                                     dtype=self.dtype) if cfg.use_post_quant_conv else identity)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images NHWC in [-1, 1] -> posterior over unscaled latents (shift_factor and
        scaling_factor are the system's to apply)."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents NHWC -> images NHWC (nominally [-1, 1], not clipped)."""
        x = self.decoder(self.post_quant_conv(z.astype(self.dtype)))
        return x.astype(jnp.float32)

    def __call__(self, x: jax.Array, sample_posterior: bool = False,
                 rng: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction and posterior; the reconstruction decodes a posterior sample (needs
        `rng`) when `sample_posterior`, else the posterior mean."""
        if sample_posterior and rng is None:
            raise ValueError("AutoencoderKL: sample_posterior=True needs an rng.")
        posterior = self.encode(x)
        z = posterior.sample(rng) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


@jax.jit  # one compiled init: op-by-op initialisation dispatches thousands of ops
def init_params(config: AutoencoderKLConfig, rng: jax.Array) -> dict:
    """Freshly initialised params; `jax.eval_shape(init_params, config, rng)` gives the shapes.

    The dummy image is the smallest the encoder accepts: one latent pixel."""
    side = config.downsampling_factor
    x = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    return AutoencoderKL(config).init(rng, x)["params"]


def encode(model: AutoencoderKL, params: dict, images: jax.Array) -> DiagonalGaussian:
    return model.apply({"params": params}, images, method=AutoencoderKL.encode)


def decode(model: AutoencoderKL, params: dict, z: jax.Array) -> jax.Array:
    return model.apply({"params": params}, z, method=AutoencoderKL.decode)

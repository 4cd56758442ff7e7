"""ControlNet (diffusers `ControlNetModel`): the U-Net's encoder half reading a control image.

The encoder half (time embedding, SDXL's `add_embedding`, `conv_in`, the down blocks and the
mid block) is the U-Net's own code (`unet.time_embedding`, `unet.encoder`), so its params
have the U-Net's names and `ControlNetModel.from_unet` is a copy of those subtrees. Besides
them: `controlnet_cond_embedding`, a small conv net taking the control image ([B, 8H, 8W, 3]
for [B, H, W, C] latents) to conv_in's width, added to conv_in's output; a zero-initialised
1x1 conv on every skip (`controlnet_down_blocks_i`) and on the mid block's output
(`controlnet_mid_block`). The outputs are what the U-Net adds to its skips and its mid block
(`cond["down_residuals"]`, `cond["mid_residual"]`), scaled by `conditioning_scale`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import unet as unet_lib
from diffusion_jax.models.layers import conv

Dtype = Any

# Keys of a diffusers ControlNetModel config.json that are the encoder half's: they mean
# what they mean in a UNet2DConditionModel config (and are checked by UNetConfig).
_ENCODER_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "block_out_channels",
    "layers_per_block", "downsample_padding", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "upcast_attention", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
)
# Keys whose only supported value is diffusers' default (as for the U-Net).
_FIXED_KEYS = ("mid_block_type", "only_cross_attention", "mid_block_scale_factor", "act_fn",
               "encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type",
               "num_class_embeds", "resnet_time_scale_shift")
_IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                           "addition_embed_type_num_heads"})
_UP_BLOCK = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a diffusers `ControlNetModel` (its config.json key names and defaults:
    SD 1.5's encoder half)."""

    in_channels: int = 4
    conditioning_channels: int = 3  # channels of the control image
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": channels flipped on input
    # Channels of the control image's conv net, one stride-2 stage between each two.
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # residuals averaged over space (the shuffle model)

    def __post_init__(self):
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("ControlNet config controlnet_conditioning_channel_order="
                             f"{self.controlnet_conditioning_channel_order!r}: supported are "
                             "'rgb' and 'bgr'")
        self.unet  # noqa: B018  (the encoder half's checks)

    @property
    def unet(self) -> unet_lib.UNetConfig:
        """The encoder half as the U-Net config it is copied from (its up path mirrored)."""
        fields = {k: getattr(self, k) for k in _ENCODER_KEYS}
        return unet_lib.UNetConfig(
            **fields, out_channels=self.in_channels,
            up_block_types=tuple(_UP_BLOCK.get(t, t) for t in reversed(self.down_block_types)))

    @property
    def context_dim(self) -> int:
        return self.cross_attention_dim

    @property
    def downsampling(self) -> int:
        return self.unet.downsampling

    @property
    def hint_downsampling(self) -> int:
        """Control-image pixels per latent pixel along each side (8 for the released ones)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def num_down_residuals(self) -> int:
        """One per U-Net skip: conv_in's output, every resnet's, every downsampler's."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + n - 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ControlNetConfig":
        """From a diffusers ControlNetModel config.json dict (or a configs/*.py section)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in fields and k not in _FIXED_KEYS
                   and k not in _IGNORED_KEYS]
        if unknown:
            raise ValueError(f"ControlNet config key(s) {unknown} are not supported; known keys: "
                             f"{sorted(fields | set(_FIXED_KEYS))}")
        # The fixed keys mean what they mean for a U-Net, which checks their values.
        unet_lib.UNetConfig.from_dict({k: d[k] for k in _FIXED_KEYS if k in d})
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        if kwargs.get("upcast_attention", False) is None:
            kwargs["upcast_attention"] = False
        if kwargs.get("conditioning_embedding_out_channels", ()) is None:
            kwargs.pop("conditioning_embedding_out_channels")  # diffusers: None means default
        return cls(**kwargs)

    @classmethod
    def from_unet(cls, unet: unet_lib.UNetConfig, **options) -> "ControlNetConfig":
        """The ControlNet of a U-Net, as diffusers' `ControlNetModel.from_unet` builds it."""
        return cls(**{k: getattr(unet, k) for k in _ENCODER_KEYS}, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ControlNetConditioningEmbedding(nn.Module):
    """Control image -> conv_in's width at latent resolution: conv_in, pairs of (3x3 conv,
    stride-2 3x3 conv) between the channel counts, conv_out; SiLU after all but conv_out."""

    out_channels: int
    channels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(conv(self.channels[0], 3, name="conv_in", dtype=self.dtype)(x))
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            x = nn.silu(conv(c_in, 3, name=f"blocks_{2 * i}", dtype=self.dtype)(x))
            x = nn.silu(conv(c_out, 3, stride=2, name=f"blocks_{2 * i + 1}", dtype=self.dtype)(x))
        return conv(self.out_channels, 3, name="conv_out", dtype=self.dtype)(x)


def guess_mode_scales(count: int) -> np.ndarray:
    """diffusers' guess-mode scales, `logspace(-1, 0, count + 1)`: 0.1 for the first skip
    up to 1.0 for the mid block."""
    return np.logspace(-1, 0, count + 1).astype(np.float32)


class ControlNetModel(nn.Module):
    """(latents [B, H, W, C], timesteps, text [B, T, D], control image [B, 8H, 8W, 3]) ->
    (down residuals, one per U-Net skip, mid residual), float32.

    `conditioning_scale` multiplies every residual: a scalar or one per batch row [B] (traced
    or not); `guess_mode` scales them by `guess_mode_scales` times it, as diffusers does."""

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
                 encoder_hidden_states: jax.Array, controlnet_cond: jax.Array,
                 conditioning_scale: jax.Array | float = 1.0,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
                 guess_mode: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
        cfg, unet = self.config, self.config.unet
        unet_lib.check_sample_shape(unet, sample.shape)
        unet_lib.check_context(unet, encoder_hidden_states)
        b, h, w, _ = sample.shape
        f = cfg.hint_downsampling
        expected = (b, h * f, w * f, cfg.conditioning_channels)
        if tuple(controlnet_cond.shape) != expected:
            raise ValueError(f"controlnet_cond must be {list(expected)} (NHWC, {f}x the latents' "
                             f"sides), got shape {tuple(controlnet_cond.shape)}")
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]

        temb = unet_lib.time_embedding(unet, timesteps, b, text_embeds, time_ids, dtype=self.dtype)
        hint = ControlNetConditioningEmbedding(
            cfg.block_out_channels[0], tuple(cfg.conditioning_embedding_out_channels),
            dtype=self.dtype, name="controlnet_cond_embedding")(controlnet_cond.astype(self.dtype))
        x, skips = unet_lib.encoder(unet, sample, temb, encoder_hidden_states, dtype=self.dtype,
                                    remat_policy=self.remat_policy,
                                    attention_impl=self.attention_impl, hint=hint)
        down = [conv(s.shape[-1], 1, name=f"controlnet_down_blocks_{i}", dtype=self.dtype)(s)
                for i, s in enumerate(skips)]
        mid = conv(x.shape[-1], 1, name="controlnet_mid_block", dtype=self.dtype)(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if scale.ndim:  # one per batch row
            scale = scale.reshape(-1, 1, 1, 1)
        weights = (guess_mode_scales(len(down)) if guess_mode and not cfg.global_pool_conditions
                   else np.ones(len(down) + 1, np.float32))
        down = [r.astype(jnp.float32) * (scale * w) for r, w in zip(down, weights)]
        mid = mid.astype(jnp.float32) * (scale * weights[-1])
        if cfg.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def init_params(config: ControlNetConfig, rng: jax.Array) -> dict:
    """The 'params' collection on the smallest input the config takes (see unet.init_params)."""
    side = config.downsampling
    sample = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    hint = jnp.zeros((1, side * config.hint_downsampling, side * config.hint_downsampling,
                      config.conditioning_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        extra = dict(text_embeds=jnp.zeros((1, pooled), jnp.float32),
                     time_ids=jnp.zeros((1, 1), jnp.float32))
    return ControlNetModel(config).init(rng, sample, jnp.zeros((1,)), context, hint,
                                        **extra)["params"]


# The U-Net subtrees a ControlNet starts from (`ControlNetModel.from_unet`); `add_embedding`
# only where the U-Net has one (SDXL's text_time).
_FROM_UNET = ("conv_in", "time_embedding", "add_embedding", "mid_block")


def _is_zero_conv(name: str) -> bool:
    return name.startswith(("controlnet_down_blocks_", "controlnet_mid_block"))


def params_from_unet(unet_params: Mapping[str, Any], config: ControlNetConfig,
                     rng: jax.Array) -> dict:
    """A new ControlNet as `ControlNetModel.from_unet` makes it: the U-Net's encoder half
    copied (conv_in, time embedding, add_embedding, down blocks, mid block), the
    conditioning embedding random but for its conv_out, every zero conv at zero (diffusers
    zero-initialises those so that a new ControlNet adds nothing). The copies are new
    buffers: the trainer donates the ControlNet's params and keeps the U-Net's."""
    fresh = init_params(config, rng)
    params = {}
    for name, tree in fresh.items():
        if name in _FROM_UNET or name.startswith("down_blocks_"):
            if name not in unet_params:
                raise ValueError(f"the U-Net params have no {name!r} that the ControlNet "
                                 "copies: a ControlNet config of another U-Net?")
            copied = jax.tree.map(lambda a: jnp.array(a, copy=True), dict(unet_params[name]))
            if jax.tree.map(jnp.shape, copied) != jax.tree.map(jnp.shape, tree):
                raise ValueError(f"the U-Net's {name!r} differs in shape from the "
                                 "ControlNet config's: a ControlNet config of another U-Net?")
            params[name] = copied
        elif _is_zero_conv(name):
            params[name] = jax.tree.map(jnp.zeros_like, tree)
        else:
            params[name] = tree
    embedding = dict(params["controlnet_cond_embedding"])
    embedding["conv_out"] = jax.tree.map(jnp.zeros_like, embedding["conv_out"])
    params["controlnet_cond_embedding"] = embedding
    return params


def control(model: ControlNetModel, params: dict, x: jax.Array, t: jax.Array, cond: Mapping,
            image: jax.Array, scale: jax.Array | float, guess_mode: bool = False) -> dict:
    """The residuals as the U-Net's conditioning reads them: {"down_residuals": (...),
    "mid_residual": ...} for latents x at t under cond (context; pooled and time_ids for a
    "text_time" ControlNet) and the control image [B, 8H, 8W, 3] in [0, 1]."""
    text_time = model.config.addition_embed_type == "text_time"
    down, mid = model.apply({"params": params}, x, t, cond["context"], image, scale,
                            cond["pooled"] if text_time else None,
                            cond["time_ids"] if text_time else None, guess_mode)
    return {"down_residuals": down, "mid_residual": mid}

"""The conditional U-Net of Stable Diffusion 1.x / 2.x (diffusers `UNet2DConditionModel`).

Submodule names are the diffusers attribute names (`down_blocks_0/attentions_1/...`), so a
diffusers state dict converts by renaming alone (`convert/torch_params.py`). Layout is NHWC.
The model takes noisy latents, timesteps and text-encoder hidden states and returns the
prediction (noise, v or sample, as the schedule says) in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (Attention, Downsample2D, FeedForward, ResnetBlock2D,
                                         TimestepEmbedding, Upsample2D, conv, dense, group_norm,
                                         remat, timestep_embedding)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# `jax.checkpoint_policies` members that are policies themselves (the others build policies).

# diffusers config keys that change nothing here: metadata, and knobs of features left off.
_IGNORED_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                           "addition_embed_type_num_heads"})

# diffusers config keys whose only supported value is diffusers' default: the SD 1.x / 2.x
# architecture. Any other value is a different model, so it is rejected, not ignored.
_FIXED_KEYS = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "dropout": (0.0,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "mid_block_only_cross_attention": (None, False),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}


def _fixed_value_ok(value: Any, allowed: tuple) -> bool:
    # diffusers also takes per-block lists for some of these (e.g. transformer_layers_per_block).
    if isinstance(value, (list, tuple)):
        return all(_fixed_value_ok(v, allowed) for v in value)
    return value in allowed


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a diffusers `UNet2DConditionModel` (its config.json key names).

    Defaults are diffusers' (a key missing from a config.json means the same thing here).
    `attention_head_dim` keeps diffusers' legacy meaning: the number of heads (an int, or one
    per block). `num_attention_heads`, when a config gives it, takes precedence.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    # Transformer blocks in each attention layer: one int, or one per block (SDXL: 1, 2, 10).
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # SDXL's micro-conditioning: "text_time" adds an MLP of [pooled text embedding, sinusoidal
    # embeddings of the size/crop numbers] to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid width per micro-conditioning number
    projection_class_embeddings_input_dim: int | None = None  # pooled width + numbers x that

    def __post_init__(self):
        n = len(self.block_out_channels)
        depth = self.transformer_layers_per_block
        if not isinstance(depth, int) and len(depth) != n:
            raise ValueError(f"UNet config: {len(depth)} transformer_layers_per_block entries "
                             f"for {n} blocks")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config addition_embed_type={self.addition_embed_type!r} is "
                             "not supported; supported: [None, 'text_time']")
        if self.addition_embed_type and not (self.addition_time_embed_dim and
                                             self.projection_class_embeddings_input_dim):
            raise ValueError("UNet config: addition_embed_type='text_time' needs "
                             "addition_time_embed_dim and projection_class_embeddings_input_dim")
        for key, types, supported in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                      ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            unknown = [t for t in types if t not in supported]
            if unknown:
                raise ValueError(f"UNet config {key}: unsupported block type(s) {unknown}; "
                                 f"supported: {list(supported)}")
            if len(types) != n:
                raise ValueError(f"UNet config {key} has {len(types)} entries, "
                                 f"block_out_channels has {n}: they must match")
        heads = self.num_attention_heads or self.attention_head_dim
        if not isinstance(heads, int) and len(heads) != n:
            raise ValueError(f"UNet config: {len(heads)} attention head counts for {n} blocks")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNet config downsample_padding={self.downsample_padding}: "
                             "supported values are 0 and 1")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"UNet config: block_out_channels {bad} are not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    # What a system reads of any denoiser's config (see models/__init__.py).
    @property
    def context_dim(self) -> int:
        """Feature width of the cond["context"] it cross-attends to."""
        return self.cross_attention_dim

    @property
    def downsampling(self) -> int:
        """Latent sides must be multiples of this."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def depth_per_block(self) -> tuple[int, ...]:
        """transformer_layers_per_block as one entry per down block (up blocks: reversed)."""
        depth = self.transformer_layers_per_block
        return (depth,) * len(self.block_out_channels) if isinstance(depth, int) else tuple(depth)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """From a diffusers unet/config.json dict (or a configs/*.py `unet` section)."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in _IGNORED_KEYS:
                continue
            if key in _FIXED_KEYS:
                if not _fixed_value_ok(value, _FIXED_KEYS[key]):
                    raise ValueError(f"UNet config {key}={value!r} is not supported; "
                                     f"supported: {list(_FIXED_KEYS[key])}")
                continue
            if key not in fields:
                raise ValueError(f"UNet config key {key!r} is not supported; known keys: "
                                 f"{sorted(fields | set(_FIXED_KEYS))}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        if kwargs.get("upcast_attention", False) is None:  # SD 1.5's config.json writes null
            kwargs["upcast_attention"] = False
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-LayerNorm residuals."""

    heads: int
    dim_head: int
    upcast: bool
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        features = x.shape[-1]
        norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype,
                                 param_dtype=jnp.float32, use_fast_variance=False)
        attention = functools.partial(Attention, self.heads, self.dim_head, features,
                                      upcast=self.upcast, dtype=self.dtype,
                                      attention_impl=self.attention_impl)
        x = x + attention(name="attn1")(norm(name="norm1")(x))
        x = x + attention(name="attn2")(norm(name="norm2")(x), context)
        return x + FeedForward(features, dtype=self.dtype, name="ff")(norm(name="norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, projection in, `depth` transformer blocks over the H*W tokens, projection
    out, residual. The projections are 1x1 convs (SD 1.x) or Dense layers (SD 2.x)."""

    heads: int
    groups: int
    use_linear_projection: bool
    upcast: bool
    depth: int = 1
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dim_head = c // self.heads
        inner = self.heads * dim_head
        hidden = group_norm(self.groups, 1e-6, name="norm", dtype=self.dtype)(x)
        if self.use_linear_projection:
            hidden = dense(inner, name="proj_in", dtype=self.dtype)(hidden.reshape(b, h * w, c))
        else:
            hidden = conv(inner, 1, name="proj_in", dtype=self.dtype)(hidden).reshape(b, h * w, inner)
        for i in range(self.depth):
            hidden = BasicTransformerBlock(self.heads, dim_head, self.upcast, dtype=self.dtype,
                                           attention_impl=self.attention_impl,
                                           name=f"transformer_blocks_{i}")(hidden, context)
        if self.use_linear_projection:
            hidden = dense(c, name="proj_out", dtype=self.dtype)(hidden).reshape(b, h, w, c)
        else:
            hidden = conv(c, 1, name="proj_out", dtype=self.dtype)(hidden.reshape(b, h, w, inner))
        return hidden + x


def _resnet(config: UNetConfig, out_channels: int, name: str, dtype: Dtype) -> ResnetBlock2D:
    return ResnetBlock2D(out_channels, groups=config.norm_num_groups, eps=config.norm_eps,
                         dtype=dtype, name=name)


def _transformer(config: UNetConfig, heads: int, depth: int, name: str, dtype: Dtype,
                 attention_impl: str | None) -> Transformer2DModel:
    return Transformer2DModel(heads, config.norm_num_groups, config.use_linear_projection,
                              config.upcast_attention, depth, dtype=dtype,
                              attention_impl=attention_impl, name=name)


class DownBlock(nn.Module):
    """diffusers CrossAttnDownBlock2D (`cross_attention`) or DownBlock2D: resnets (each followed
    by a transformer in the cross-attention kind), then a stride-2 conv unless last. Returns the
    hidden states and every intermediate output, which the up path takes as skips."""

    config: UNetConfig
    out_channels: int
    heads: int
    depth: int  # transformer blocks per attention layer
    cross_attention: bool
    add_downsample: bool
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for j in range(self.config.layers_per_block):
            x = _resnet(self.config, self.out_channels, f"resnets_{j}", self.dtype)(x, temb)
            if self.cross_attention:
                x = _transformer(self.config, self.heads, self.depth, f"attentions_{j}",
                                 self.dtype, self.attention_impl)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, asymmetric_padding=self.config.downsample_padding == 0,
                             dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    config: UNetConfig
    heads: int
    depth: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = _resnet(self.config, channels, "resnets_0", self.dtype)(x, temb)
        x = _transformer(self.config, self.heads, self.depth, "attentions_0", self.dtype,
                         self.attention_impl)(x, context)
        return _resnet(self.config, channels, "resnets_1", self.dtype)(x, temb)


class UpBlock(nn.Module):
    """diffusers CrossAttnUpBlock2D or UpBlock2D: layers_per_block + 1 resnets, each on the
    hidden states concatenated with the latest unused skip, then 2x upsampling unless last."""

    config: UNetConfig
    out_channels: int
    heads: int
    depth: int
    cross_attention: bool
    add_upsample: bool
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
                 context: jax.Array) -> jax.Array:
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = _resnet(self.config, self.out_channels, f"resnets_{j}", self.dtype)(x, temb)
            if self.cross_attention:
                x = _transformer(self.config, self.heads, self.depth, f"attentions_{j}",
                                 self.dtype, self.attention_impl)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def check_sample_shape(config: UNetConfig, shape: tuple[int, ...]) -> None:
    """Raises a ValueError unless `shape` is a [B, H, W, in_channels] the U-Net can take."""
    if len(shape) != 4 or shape[-1] != config.in_channels:
        raise ValueError(f"U-Net sample must be [batch, height, width, {config.in_channels}] "
                         f"(NHWC), got shape {tuple(shape)}")
    multiple = 2 ** (len(config.block_out_channels) - 1)
    if shape[1] % multiple or shape[2] % multiple:
        raise ValueError(f"U-Net sample spatial size {shape[1]}x{shape[2]} is not a multiple of "
                         f"{multiple} (2 ** number of downsamplings); with an 8x VAE, image "
                         f"sides must be multiples of {8 * multiple}")


def time_embedding(config: UNetConfig, timesteps: jax.Array | int | float, batch: int,
                   text_embeds: jax.Array | None, time_ids: jax.Array | None, *,
                   dtype: Dtype) -> jax.Array:
    """The embedding every resnet reads: diffusers' `time_embedding(time_proj(t))`, plus
    `add_embedding(concat(text_embeds, add_time_proj(time_ids)))` for a "text_time" config.
    Call it inside a compact method: its layers are the caller's `time_embedding` and
    `add_embedding` (the U-Net's and the ControlNet's alike)."""
    channels = config.block_out_channels[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    t_emb = timestep_embedding(timesteps, channels, flip_sin_to_cos=config.flip_sin_to_cos,
                               freq_shift=config.freq_shift)
    temb = TimestepEmbedding(4 * channels, dtype=dtype, name="time_embedding")(t_emb)
    if config.addition_embed_type != "text_time":
        return temb
    if text_embeds is None or time_ids is None:
        raise ValueError("this model (addition_embed_type='text_time') needs text_embeds "
                         "(the pooled text embedding) and time_ids (size and crop numbers)")
    numbers = jnp.asarray(time_ids, jnp.float32)
    sinusoids = timestep_embedding(numbers.reshape(-1), config.addition_time_embed_dim,
                                   flip_sin_to_cos=config.flip_sin_to_cos,
                                   freq_shift=config.freq_shift).reshape(batch, -1)
    features = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), sinusoids], axis=-1)
    if features.shape[-1] != config.projection_class_embeddings_input_dim:
        raise ValueError(f"text_embeds + time_ids embeddings have {features.shape[-1]} "
                         f"features; projection_class_embeddings_input_dim is "
                         f"{config.projection_class_embeddings_input_dim}")
    return temb + TimestepEmbedding(4 * channels, dtype=dtype, name="add_embedding")(features)


def check_context(config: UNetConfig, encoder_hidden_states: jax.Array) -> None:
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != config.cross_attention_dim:
        raise ValueError(f"encoder_hidden_states must be [batch, tokens, {config.cross_attention_dim}], "
                         f"got shape {tuple(encoder_hidden_states.shape)}")


def encoder(config: UNetConfig, sample: jax.Array, temb: jax.Array, context: jax.Array, *,
            dtype: Dtype, remat_policy: str | None, attention_impl: str | None,
            hint: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """The encoder half: `conv_in` (+ `hint`, the ControlNet's embedded control image), the
    down blocks and the mid block, as the caller's submodules (call it inside a compact
    method). Returns the mid block's output and the skips: conv_in's output, then every
    down-block output, which the U-Net's up path and the ControlNet's zero convs read."""
    blocks = dict(dtype=dtype, attention_impl=attention_impl)
    down_block, mid_block = (remat(b, remat_policy) for b in (DownBlock, MidBlock))
    channels, heads, depth = config.block_out_channels, config.heads_per_block, config.depth_per_block
    x = conv(channels[0], 3, name="conv_in", dtype=dtype)(sample)
    if hint is not None:
        x = x + hint
    skips = [x]
    for i, block_type in enumerate(config.down_block_types):
        x, block_skips = down_block(config, channels[i], heads[i], depth[i],
                                    block_type == "CrossAttnDownBlock2D", i < len(channels) - 1,
                                    name=f"down_blocks_{i}", **blocks)(x, temb, context)
        skips.extend(block_skips)
    x = mid_block(config, heads[-1], depth[-1], name="mid_block", **blocks)(x, temb, context)
    return x, skips


class UNet2DConditionModel(nn.Module):
    """Denoiser eps/v(x_t, t, text): [B, H, W, C] NHWC latents, [B] or scalar timesteps (int
    or float), [B, T, D] text hidden states -> [B, H, W, out_channels] float32.

    `remat_policy` names a `jax.checkpoint_policies` policy applied to each down/mid/up block
    (None: no rematerialisation); `attention_impl` goes to `jax.nn.dot_product_attention`.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
                 encoder_hidden_states: jax.Array, text_embeds: jax.Array | None = None,
                 time_ids: jax.Array | None = None,
                 down_residuals: tuple[jax.Array, ...] | None = None,
                 mid_residual: jax.Array | None = None) -> jax.Array:
        """`text_embeds` [B, pooled] and `time_ids` [B, numbers]: the "text_time"
        micro-conditioning (SDXL); other U-Nets take neither. `down_residuals` (one per
        skip) and `mid_residual`: a ControlNet's outputs, added to the skips and to the mid
        block's output as diffusers' `down_block_additional_residuals` /
        `mid_block_additional_residual`."""
        cfg = self.config
        check_sample_shape(cfg, sample.shape)
        check_context(cfg, encoder_hidden_states)
        temb = time_embedding(cfg, timesteps, sample.shape[0], text_embeds, time_ids,
                              dtype=self.dtype)
        x, skips = encoder(cfg, sample, temb, encoder_hidden_states, dtype=self.dtype,
                           remat_policy=self.remat_policy, attention_impl=self.attention_impl)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for the U-Net's "
                                 f"{len(skips)} skips")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        up_block = remat(UpBlock, self.remat_policy)
        channels, heads, depth = cfg.block_out_channels, cfg.heads_per_block, cfg.depth_per_block
        n = len(channels)
        for i, block_type in enumerate(cfg.up_block_types):
            block_skips = tuple(skips[-(cfg.layers_per_block + 1):])
            del skips[-(cfg.layers_per_block + 1):]
            x = up_block(cfg, channels[n - 1 - i], heads[n - 1 - i], depth[n - 1 - i],
                         block_type == "CrossAttnUpBlock2D", i < n - 1, dtype=self.dtype,
                         attention_impl=self.attention_impl,
                         name=f"up_blocks_{i}")(x, block_skips, temb, encoder_hidden_states)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out",
                               dtype=self.dtype)(x))
        x = conv(cfg.out_channels, 3, name="conv_out", dtype=self.dtype)(x)
        return x.astype(jnp.float32)


def init_params(config: UNetConfig, rng: jax.Array) -> dict:
    """The 'params' collection, initialised on the smallest input the config takes. Use under
    `jax.eval_shape(functools.partial(init_params, config), rng)` for shapes without compute."""
    side = 2 ** (len(config.block_out_channels) - 1)
    sample = jnp.zeros((1, side, side, config.in_channels), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    extra = {}
    if config.addition_embed_type == "text_time":
        # The config gives only the total width (pooled + numbers x sinusoid); any split of it
        # makes the same params.
        pooled = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
        extra = dict(text_embeds=jnp.zeros((1, pooled), jnp.float32),
                     time_ids=jnp.zeros((1, 1), jnp.float32))
    return UNet2DConditionModel(config).init(rng, sample, jnp.zeros((1,)), context,
                                             **extra)["params"]


def denoise(model: UNet2DConditionModel, params: dict, x: jax.Array, t: jax.Array,
            cond: dict) -> jax.Array:
    """The system's denoiser call: cross-attention reads cond["context"]; a "text_time" U-Net
    also cond["pooled"] and cond["time_ids"]; a ControlNet's residuals come as
    cond["down_residuals"] and cond["mid_residual"] where present."""
    text_time = model.config.addition_embed_type == "text_time"
    return model.apply({"params": params}, x, t, cond["context"],
                       cond["pooled"] if text_time else None,
                       cond["time_ids"] if text_time else None,
                       cond.get("down_residuals"), cond.get("mid_residual"))

"""The Flux.1 transformer: diffusers `FluxTransformer2DModel` (Flux.1-dev and -schnell).

A rectified-flow velocity model over 2x2-packed latent patches. Text tokens (T5, projected by
`context_embedder`) and image tokens (`x_embedder`) first pass `num_layers` double-stream
blocks (`transformer_blocks`: one joint attention over [text; image] with separate
projections, RMS qk-norm and separate MLPs per stream), then `num_single_layers`
single-stream blocks (`single_transformer_blocks`: attention and MLP side by side on the
concatenated sequence, one `proj_out`). Every block is modulated (AdaLayerNormZero: shift,
scale, gate) by `temb` = MLP(sinusoids of 1000 t) + MLP(pooled CLIP) (+ MLP(sinusoids of 1000
guidance) for dev's distilled guidance). Positions enter only through RoPE on queries and
keys: ids [S, 3] (text: zeros; image: (0, row, col)) rotate axes_dims_rope (16, 56, 56)
slices of each 128-wide head, theta 10000.

Inputs are diffusers': packed `hidden_states` [B, S_img, 64], `encoder_hidden_states`
[B, S_txt, 4096], `pooled_projections` [B, 768], `timestep` [B] = sigma in [0, 1] (the
pipeline passes t / 1000; the model multiplies by 1000, here as there), `img_ids`
[S_img, 3], `txt_ids` [S_txt, 3] and `guidance` [B] (dev only). The ids are positions known
on the host (numpy): their RoPE tables are computed there in float64, as diffusers computes
them. `pack_latents` / `unpack_latents` / `latent_image_ids` are FluxPipeline's, for our NHWC
latents; `denoise` (the system's denoiser call) applies them around the model.

Submodule names are diffusers' attribute names, so a diffusers `transformer` state dict
converts with `convert.torch_params.state_dict_to_params` by renaming alone:

    transformer_blocks_3/attn/add_q_proj/kernel  <- transformer_blocks.3.attn.add_q_proj.weight (T)
    transformer_blocks_3/attn/norm_added_k/scale <- transformer_blocks.3.attn.norm_added_k.weight
    transformer_blocks_3/attn/to_out_0           <- transformer_blocks.3.attn.to_out.0
    transformer_blocks_3/ff_context/net_0/proj   <- transformer_blocks.3.ff_context.net.0.proj
    single_transformer_blocks_7/norm/linear      <- single_transformer_blocks.7.norm.linear
    time_text_embed/guidance_embedder/linear_1   <- time_text_embed.guidance_embedder.linear_1
    norm_out/linear, proj_out, x_embedder, context_embedder: the same names

(Linear weights transposed; no buffers: `pos_embed` has no state.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.layers import (AdaLayerNormContinuous, RMSNorm, TanhGELUFeedForward,
                                         TimestepEmbedding, dense, dot_product_attention,
                                         plain_layer_norm, remat, timestep_embedding)

Dtype = Any

ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000) in FluxTransformer2DModel


@jax.tree_util.register_static  # a pytree without leaves: passes through jit / eval_shape
@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """diffusers `FluxTransformer2DModel` config (its config.json names and defaults)."""

    patch_size: int = 1  # proj_out width is patch_size^2 * out_channels (2x2 packing is outside)
    in_channels: int = 64  # packed token width: 16 latent channels x 2 x 2
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(
                d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"Flux config: axes_dims_rope {list(self.axes_dims_rope)} must be "
                             f"even and sum to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    # What a system reads of any denoiser's config (see models/__init__.py).
    @property
    def context_dim(self) -> int:
        return self.joint_attention_dim

    @property
    def input_latent_channels(self) -> int:
        """The latent channels a token packs 2x2 of (the VAE's latent_channels)."""
        return self.in_channels // 4

    @property
    def downsampling(self) -> int:
        """Latent sides must be even: the 2x2 packing."""
        return 2

    # The latent side of the default image (FluxPipeline's default_sample_size: 1024 px); its
    # config.json has no sample_size.
    sample_size = 128

    # What the pipeline reads of a denoiser's guidance (other denoisers: CFG, no input).
    # FluxPipeline's guidance_scale is never classifier-free: dev embeds it as an input
    # (`guidance_embeds`), schnell ignores it; CFG is its separate true_cfg_scale.
    classifier_free_guidance = False

    @property
    def guidance_input(self) -> bool:
        return self.guidance_embeds

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FluxConfig":
        """From a diffusers `transformer/config.json` dict (or a configs/*.py section)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key not in fields:
                raise ValueError(f"Flux config key {key!r} is not supported; known keys: "
                                 f"{sorted(fields)}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------- latents, ids


def pack_latents(latents: jax.Array) -> jax.Array:
    """NHWC latents [B, H, W, C] -> tokens [B, H/2 * W/2, C * 4], each token a 2x2 patch with
    features ordered (c, dy, dx): FluxPipeline._pack_latents on the NCHW tensor."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: jax.Array, height: int, width: int,
                   vae_scale_factor: int = 8) -> jax.Array:
    """Tokens [B, S, C * 4] of an image height x width (pixels) -> NHWC latents
    [B, 2 (height // (2 f)), 2 (width // (2 f)), C]: FluxPipeline._unpack_latents, NHWC."""
    b, _, channels = latents.shape
    h = 2 * (int(height) // (vae_scale_factor * 2))
    w = 2 * (int(width) // (vae_scale_factor * 2))
    x = latents.reshape(b, h // 2, w // 2, channels // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, channels // 4)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """Position ids [height * width, 3] float32 of a packed token grid (height, width: the
    latent sides / 2), row-major, (0, row, col): FluxPipeline._prepare_latent_image_ids."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def text_ids(length: int) -> np.ndarray:
    """Text position ids [length, 3]: all zeros, as FluxPipeline.encode_prompt's text_ids."""
    return np.zeros((length, 3), np.float32)


def _host_ids(ids) -> np.ndarray:
    if isinstance(ids, jax.core.Tracer):
        raise TypeError("Flux position ids are computed on the host: pass img_ids / txt_ids "
                        "as numpy arrays (fixed by the shapes), not traced values")
    return np.asarray(ids, np.float32)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...],
                theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """FluxPosEmbed: (cos, sin) [S, sum(axes_dims)] float32 of position ids [S, n_axes], each
    axis's angles pos * theta^(-2j/d) in float64, every value repeated twice (the pairs
    (2j, 2j + 1) that one angle rotates)."""
    pos = _host_ids(ids).astype(np.float64)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.outer(pos[:, axis], freqs)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return (np.concatenate(cos, axis=1).astype(np.float32),
            np.concatenate(sin, axis=1).astype(np.float32))


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates each pair (x[2j], x[2j+1]) of [B, S, heads, d] by its angle (diffusers'
    apply_rotary_emb, use_real_unbind_dim=-1), in float32."""
    cos, sin = (r[None, :, None, :] for r in rope)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- layers


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by linear(silu(temb)): returns the normed x (shift/scale of the
    attention) and `chunks - 2` further vectors (gate, and for the double blocks the MLP's
    shift, scale, gate). chunks=6: AdaLayerNormZero, chunks=3: AdaLayerNormZeroSingle."""

    chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array):
        dim = x.shape[-1]
        emb = dense(self.chunks * dim, name="linear", dtype=self.dtype)(nn.silu(temb))
        shift, scale, *rest = jnp.split(emb, self.chunks, axis=-1)
        x = plain_layer_norm("norm", self.dtype)(x) * (1 + scale[:, None]) + shift[:, None]
        return x, rest


class FluxAttention(nn.Module):
    """Attention with RMS qk-norm and RoPE. With `context` (double blocks): the text stream's
    own projections (add_*_proj, norm_added_*), one attention over [text; image], outputs
    split back (to_out.0 for the image, to_add_out for the text). Without (single blocks):
    self-attention with no output projection (the block's proj_out follows)."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, rope):
        inner = self.heads * self.dim_head
        proj = functools.partial(dense, inner, dtype=self.dtype)
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, self.dim_head)
        norm = lambda name: RMSNorm(1e-6, self.dtype, name=name)
        q = norm("norm_q")(split(proj(name="to_q")(x)))
        k = norm("norm_k")(split(proj(name="to_k")(x)))
        v = split(proj(name="to_v")(x))
        if context is not None:  # the text tokens first
            text_q = norm("norm_added_q")(split(proj(name="add_q_proj")(context)))
            text_k = norm("norm_added_k")(split(proj(name="add_k_proj")(context)))
            text_v = split(proj(name="add_v_proj")(context))
            q, k, v = (jnp.concatenate(pair, axis=1)
                       for pair in ((text_q, q), (text_k, k), (text_v, v)))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        merge = lambda y: y.reshape(*y.shape[:-2], inner)
        out = dot_product_attention(merge(q), merge(k), merge(v), heads=self.heads,
                                    implementation=self.attention_impl)
        if context is None:
            return out
        text = context.shape[1]
        return (dense(x.shape[-1], name="to_out_0", dtype=self.dtype)(out[:, text:]),
                dense(context.shape[-1], name="to_add_out", dtype=self.dtype)(out[:, :text]))


def _clip_float16(x: jax.Array) -> jax.Array:
    # diffusers clips each block's float16 output to the finite range.
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: (text, image) -> (text, image), each stream modulated by its own
    AdaLayerNormZero (norm1 / norm1_context) and MLP (ff / ff_context)."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, hidden: jax.Array, context: jax.Array, temb: jax.Array, rope):
        normed, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = AdaLayerNormZero(
            6, self.dtype, name="norm1")(hidden, temb)
        normed_context, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = AdaLayerNormZero(
            6, self.dtype, name="norm1_context")(context, temb)
        attn, context_attn = FluxAttention(self.heads, self.dim_head, self.dtype,
                                           self.attention_impl, name="attn")(
            normed, normed_context, rope)

        hidden = hidden + gate_msa[:, None] * attn
        normed = (plain_layer_norm("norm2", self.dtype)(hidden) * (1 + scale_mlp[:, None])
                  + shift_mlp[:, None])
        hidden = hidden + gate_mlp[:, None] * TanhGELUFeedForward(self.dtype, name="ff")(normed)

        context = context + c_gate_msa[:, None] * context_attn
        normed_context = (plain_layer_norm("norm2_context", self.dtype)(context)
                          * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None])
        feed_forward = TanhGELUFeedForward(self.dtype, name="ff_context")
        context = context + c_gate_mlp[:, None] * feed_forward(normed_context)
        return _clip_float16(context), _clip_float16(hidden)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text; image] sequence: attention and a tanh-GELU MLP
    (proj_mlp) from one AdaLayerNormZeroSingle, their outputs side by side into proj_out.
    (diffusers splits and re-joins the two streams around each block; the sequence here stays
    joined from the first single block to the last: the same values.)"""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, rope) -> jax.Array:
        dim = x.shape[-1]
        normed, (gate,) = AdaLayerNormZero(3, self.dtype, name="norm")(x, temb)
        mlp = jax.nn.gelu(dense(4 * dim, name="proj_mlp", dtype=self.dtype)(normed),
                          approximate=True)
        attn = FluxAttention(self.heads, self.dim_head, self.dtype, self.attention_impl,
                             name="attn")(normed, None, rope)
        out = dense(dim, name="proj_out", dtype=self.dtype)(jnp.concatenate([attn, mlp], -1))
        return _clip_float16(x + gate[:, None] * out)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb = timestep_embedder(sinusoids(t)) [+ guidance_embedder(sinusoids(guidance))]
    + text_embedder(pooled): diffusers' CombinedTimestep(Guidance)TextProjEmbeddings (the
    text_embedder, PixArtAlphaTextProjection with SiLU, is the same linear_1-SiLU-linear_2)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, guidance: jax.Array | None,
                 pooled: jax.Array) -> jax.Array:
        sinusoids = functools.partial(timestep_embedding, dim=256, flip_sin_to_cos=True,
                                      freq_shift=0)
        emb = TimestepEmbedding(self.features, self.dtype, name="timestep_embedder")(
            sinusoids(timestep).astype(self.dtype))
        if guidance is not None:
            emb = emb + TimestepEmbedding(self.features, self.dtype, name="guidance_embedder")(
                sinusoids(guidance).astype(self.dtype))
        return emb + TimestepEmbedding(self.features, self.dtype, name="text_embedder")(
            pooled.astype(self.dtype))


class FluxTransformer2DModel(nn.Module):
    """Velocity v(x_t, t, text) on packed tokens, diffusers' signature (see the module
    docstring); returns [B, S_img, patch_size^2 * out_channels] float32.

    `remat_policy` names a `jax.checkpoint_policies` policy applied to each block (None: no
    rematerialisation); `attention_impl` as `layers.dot_product_attention` takes it.
    """

    config: FluxConfig
    dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, timestep: jax.Array, img_ids: np.ndarray,
                 txt_ids: np.ndarray, guidance: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        if cfg.guidance_embeds != (guidance is not None):
            raise ValueError("Flux: guidance is required with guidance_embeds (Flux.1-dev) and "
                             "refused without (schnell): guidance_embeds="
                             f"{cfg.guidance_embeds}, guidance given: {guidance is not None}")
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"Flux hidden_states must be packed [batch, tokens, "
                             f"{cfg.in_channels}], got shape {tuple(hidden_states.shape)}")
        if tuple(np.shape(img_ids)) != (hidden_states.shape[1], 3) or tuple(
                np.shape(txt_ids)) != (encoder_hidden_states.shape[1], 3):
            raise ValueError(f"Flux img_ids / txt_ids must be [tokens, 3] for "
                             f"{hidden_states.shape[1]} image and "
                             f"{encoder_hidden_states.shape[1]} text tokens, got "
                             f"{np.shape(img_ids)} / {np.shape(txt_ids)}")
        ids = np.concatenate([_host_ids(txt_ids), _host_ids(img_ids)])  # text first
        rope = tuple(jnp.asarray(r) for r in rope_tables(ids, cfg.axes_dims_rope))

        batch = hidden_states.shape[0]
        per_example = lambda v: jnp.broadcast_to(jnp.asarray(v).astype(self.dtype) * 1000,
                                                 (batch,))
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, self.dtype,
                                                  name="time_text_embed")(
            per_example(timestep), None if guidance is None else per_example(guidance),
            pooled_projections)
        hidden = dense(cfg.inner_dim, name="x_embedder", dtype=self.dtype)(
            hidden_states.astype(self.dtype))
        context = dense(cfg.inner_dim, name="context_embedder", dtype=self.dtype)(
            encoder_hidden_states.astype(self.dtype))

        blocks = dict(heads=cfg.num_attention_heads, dim_head=cfg.attention_head_dim,
                      dtype=self.dtype, attention_impl=self.attention_impl)
        double_block = remat(FluxTransformerBlock, self.remat_policy)
        single_block = remat(FluxSingleTransformerBlock, self.remat_policy)
        for i in range(cfg.num_layers):
            context, hidden = double_block(**blocks, name=f"transformer_blocks_{i}")(
                hidden, context, temb, rope)
        text = context.shape[1]
        x = jnp.concatenate([context, hidden], axis=1)
        for i in range(cfg.num_single_layers):
            x = single_block(**blocks, name=f"single_transformer_blocks_{i}")(x, temb, rope)
        hidden = AdaLayerNormContinuous(self.dtype, name="norm_out")(x[:, text:], temb)
        out = dense(cfg.patch_size ** 2 * cfg.output_channels, name="proj_out",
                    dtype=self.dtype)(hidden)
        return out.astype(jnp.float32)


@jax.jit  # one compiled init: op-by-op initialisation dispatches thousands of ops
def init_params(config: FluxConfig, rng: jax.Array) -> dict:
    """Freshly initialised params; `jax.eval_shape(init_params, config, rng)` gives the shapes."""
    guidance = jnp.zeros((1,)) if config.guidance_embeds else None
    return FluxTransformer2DModel(config).init(
        rng, jnp.zeros((1, 1, config.in_channels)), jnp.zeros((1, 1, config.joint_attention_dim)),
        jnp.zeros((1, config.pooled_projection_dim)), jnp.zeros((1,)), latent_image_ids(1, 1),
        text_ids(1), guidance)["params"]


def denoise(model: FluxTransformer2DModel, params: dict, x: jax.Array, t: jax.Array,
            cond: dict) -> jax.Array:
    """The system's denoiser call on NHWC latents [B, H, W, C] (H, W even) at the flow
    process's model time t = 1000 sigma: packed, with the ids of FluxPipeline (text ids
    zero), the transformer at timestep t / 1000 (as the pipeline passes it), unpacked.
    cond: "context" (T5) [B, S_txt, joint_attention_dim], "pooled" (CLIP) [B, pooled], and
    "guidance" [B] (the distilled guidance scale) for Flux.1-dev."""
    b, h, w, _ = x.shape
    timestep = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,)) / 1000
    out = model.apply({"params": params}, pack_latents(x), cond["context"], cond["pooled"],
                      timestep, latent_image_ids(h // 2, w // 2),
                      text_ids(cond["context"].shape[1]), cond.get("guidance"))
    return unpack_latents(out, h, w, vae_scale_factor=1)

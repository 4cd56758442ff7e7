"""The MMDiT of Stable Diffusion 3 / 3.5: diffusers `SD3Transformer2DModel`.

Latents are cut into p x p patches (`pos_embed.proj`, a stride-p conv) and a fixed 2-D sin-cos
position embedding is added: diffusers computes it once on a pos_embed_max_size^2 grid and
crops the centre h x w of it for an h x w patch grid. The text context (CLIP-L + CLIP-G + T5
tokens, `joint_attention_dim` wide) is projected by `context_embedder`; the conditioning
vector is the timestep's sinusoid MLP plus an MLP of the pooled CLIP embedding
(`time_text_embed`). Each `JointTransformerBlock` modulates both streams with AdaLN-Zero from
that vector and attends over the concatenation [image tokens, text tokens] with separate
projections per stream (`to_q/k/v` for the image, `add_q/k/v_proj` for the text); the last
block is `context_pre_only` (its text stream ends at the attention's keys and values). SD3.5
adds RMS norms on each head's queries and keys (`qk_norm="rms_norm"`) and, in the
`dual_attention_layers` (3.5-medium: 0..12), a second image-only self-attention `attn2`
modulated by three more AdaLN vectors (diffusers' `SD35AdaLayerNormZeroX`). `norm_out`
(AdaLayerNormContinuous), `proj_out` and unpatchifying give the velocity.

Submodule names are diffusers' attribute names, a list index written `name_i`, so a diffusers
`transformer/` state dict converts by `convert/torch_params.py`'s rename alone:

    transformer_blocks_3/attn/add_q_proj/kernel  <-> transformer_blocks.3.attn.add_q_proj.weight
    transformer_blocks_0/ff/net_0/proj/kernel    <-> transformer_blocks.0.ff.net.0.proj.weight
    transformer_blocks_0/attn/norm_added_q/scale <-> transformer_blocks.0.attn.norm_added_q.weight
    time_text_embed/text_embedder/linear_1/...   <-> time_text_embed.text_embedder.linear_1....
    pos_embed/proj/kernel (HWIO)                 <-> pos_embed.proj.weight (OIHW)

The state dict's `pos_embed.pos_embed` is that constant table, a buffer rather than a
parameter: it is not loaded (`state_dict_to_params(..., ignore=[r"^pos_embed\\.pos_embed$"])`)
but recomputed on the host as diffusers' `get_2d_sincos_pos_embed` computes it.

Layout is NHWC, as the U-Net's: [B, H, W, in_channels] latents -> [B, H, W, out_channels]
float32 whatever the compute dtype. The timestep is what diffusers' SD3 pipelines pass,
sigma * 1000 (`diffusion/flow.py` feeds t * num_train_timesteps).
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
                                         TimestepEmbedding, conv, dense, dot_product_attention,
                                         plain_layer_norm, remat, timestep_embedding)

Dtype = Any

QK_NORMS = (None, "rms_norm")
TIMESTEP_CHANNELS = 256  # CombinedTimestepTextProjEmbeddings' sinusoid width (hard-coded there)


@jax.tree_util.register_static  # a pytree without leaves: passes through jit / eval_shape
@dataclasses.dataclass(frozen=True)
class SD3TransformerConfig:
    """diffusers `SD3Transformer2DModel` config (its key names and defaults)."""

    sample_size: int = 128  # latent side the model was trained at (sets the position grid's scale)
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # text context width
    caption_projection_dim: int = 1152  # context_embedder's output: the token width
    pooled_projection_dim: int = 2048  # pooled CLIP-L + CLIP-G width
    out_channels: int | None = 16  # None: in_channels
    pos_embed_max_size: int = 96  # side of the position grid, in patches
    dual_attention_layers: tuple[int, ...] = ()  # blocks with the second self-attention (SD3.5)
    qk_norm: str | None = None  # "rms_norm": SD3.5's per-head RMS norm of queries and keys

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3Transformer2DModel config: qk_norm={self.qk_norm!r} is not "
                             f"supported; supported: {list(QK_NORMS)}.")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"SD3Transformer2DModel config: caption_projection_dim="
                f"{self.caption_projection_dim} must equal num_attention_heads * "
                f"attention_head_dim = {self.inner_dim} (text and image tokens share the "
                "joint blocks' width).")
        if self.inner_dim % 4:
            raise ValueError(f"SD3Transformer2DModel config: the width {self.inner_dim} must be "
                             "a multiple of 4 (two 1-D sin-cos embeddings of sin and cos halves).")
        if not self.pos_embed_max_size:
            raise ValueError("SD3Transformer2DModel config: pos_embed_max_size must be set "
                             "(every SD3 / SD3.5 release sets it).")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    # What a system reads of any denoiser's config (see models/__init__.py).
    @property
    def context_dim(self) -> int:
        return self.joint_attention_dim

    @property
    def downsampling(self) -> int:
        return self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SD3TransformerConfig":
        """From a diffusers `transformer/config.json` dict (or a configs/*.py section)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif not key.startswith("_"):  # diffusers' metadata: _class_name, ...
                raise ValueError(f"SD3Transformer2DModel config: unknown key {key!r}; "
                                 f"supported keys: {sorted(fields)}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def sincos_embedding_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """diffusers' `get_1d_sincos_pos_embed_from_grid`: [sin(p w), cos(p w)] with
    w = 10000^(-i / (dim / 2)), in float64 (float32 positions promoted, as torch.outer does)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def position_embedding_axes(config: SD3TransformerConfig, height: int, width: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The centre height x width crop of diffusers' `pos_embed.pos_embed` table, as its two
    float32 factors: (columns [width, D/2], rows [height, D/2]). Patch (i, j)'s embedding is
    concat(columns[j], rows[i]): `get_2d_sincos_pos_embed` embeds the grid's w coordinate in
    the first half of the channels and h in the second, on positions arange(G) / (G / base)
    (float32, G = pos_embed_max_size, base = sample_size / patch_size), crop top-left at
    ((G - height) // 2, (G - width) // 2)."""
    grid = config.pos_embed_max_size
    base = config.sample_size // config.patch_size
    positions = np.arange(grid, dtype=np.float32) / np.float32(grid / base)
    top, left = (grid - height) // 2, (grid - width) // 2
    half = config.inner_dim // 2
    columns = sincos_embedding_1d(half, positions[left:left + width]).astype(np.float32)
    rows = sincos_embedding_1d(half, positions[top:top + height]).astype(np.float32)
    return columns, rows


def position_embedding(config: SD3TransformerConfig, height: int, width: int) -> jax.Array:
    """[height * width, inner_dim] float32, row-major patches: the cropped table, built from
    its two small factors (the whole table is 0.9 GB for SD3.5-medium)."""
    columns, rows = position_embedding_axes(config, height, width)
    half = columns.shape[-1]
    table = jnp.concatenate([jnp.broadcast_to(jnp.asarray(columns)[None], (height, width, half)),
                             jnp.broadcast_to(jnp.asarray(rows)[:, None], (height, width, half))],
                            axis=-1)
    return table.reshape(height * width, 2 * half)


class PatchEmbed(nn.Module):
    """diffusers `PatchEmbed` with `pos_embed_max_size`: stride-p conv, then + the cropped
    sin-cos table. [B, H, W, C] -> [B, (H/p)(W/p), inner_dim]."""

    config: SD3TransformerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        x = conv(cfg.inner_dim, p, stride=p, padding="VALID", name="proj",
                 dtype=self.dtype)(latents)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        return x + position_embedding(cfg, h, w).astype(x.dtype)[None]


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """The conditioning vector: MLP(sinusoid(t), 256 wide) + MLP(pooled). Both MLPs are
    linear_1 -> SiLU -> linear_2 (the pooled one is diffusers' PixArtAlphaTextProjection with
    act_fn="silu"), so layers.TimestepEmbedding serves for each."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        sinusoid = timestep_embedding(timestep, TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                      freq_shift=0)
        t_emb = TimestepEmbedding(self.features, self.dtype, name="timestep_embedder")(sinusoid)
        return t_emb + TimestepEmbedding(self.features, self.dtype, name="text_embedder")(pooled)


class AdaLayerNormZero(nn.Module):
    """diffusers `AdaLayerNormZero` (6 modulation vectors from SiLU(temb)) or, with `dual`,
    `SD35AdaLayerNormZeroX` (9: three more for attn2's input and gate). Returns the modulated
    input and the other vectors: (x, gate_msa, shift_mlp, scale_mlp, gate_mlp[, x2, gate_msa2])."""

    dual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, ...]:
        n = 9 if self.dual else 6
        emb = dense(n * x.shape[-1], name="linear", dtype=self.dtype)(nn.silu(temb))
        chunks = [c[:, None] for c in jnp.split(emb, n, axis=-1)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        normed = plain_layer_norm("norm", self.dtype)(x)
        out = (normed * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
            out += (normed * (1 + scale_msa2) + shift_msa2, gate_msa2)
        return out


class JointAttention(nn.Module):
    """diffusers `Attention` with `JointAttnProcessor2_0`. With a context, the image tokens
    (to_q/k/v) and text tokens (add_q/k/v_proj) attend jointly over [image, text] and each
    stream has its output projection (to_out.0; to_add_out unless `context_pre_only`).
    Without (SD3.5's attn2, `context_pre_only=None`): plain self-attention, no add_* params."""

    heads: int
    dim_head: int
    qk_norm: str | None = None
    context_pre_only: bool | None = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def _project(self, x: jax.Array, names: tuple[str, str, str],
                 norms: tuple[str, str]) -> tuple[jax.Array, jax.Array, jax.Array]:
        proj = functools.partial(dense, self.heads * self.dim_head, dtype=self.dtype)
        q, k, v = (proj(name=n)(x) for n in names)
        if self.qk_norm == "rms_norm":  # over each head's features
            per_head = lambda y, name: RMSNorm(dtype=self.dtype, name=name)(
                y.reshape(*y.shape[:-1], self.heads, self.dim_head)).reshape(y.shape)
            q, k = per_head(q, norms[0]), per_head(k, norms[1])
        return q, k, v

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None
                 ) -> jax.Array | tuple[jax.Array, jax.Array | None]:
        q, k, v = self._project(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if context is not None:
            cq, ck, cv = self._project(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                       ("norm_added_q", "norm_added_k"))
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
        out = dot_product_attention(q, k, v, heads=self.heads, implementation=self.attention_impl)
        n = x.shape[1]
        x_out = dense(x.shape[-1], name="to_out_0", dtype=self.dtype)(out[:, :n])
        if context is None:
            return x_out
        if self.context_pre_only:
            return x_out, None
        return x_out, dense(context.shape[-1], name="to_add_out", dtype=self.dtype)(out[:, n:])


class JointTransformerBlock(nn.Module):
    """diffusers `JointTransformerBlock`: (context, x, temb) -> (context or None, x)."""

    config: SD3TransformerConfig
    context_pre_only: bool = False
    use_dual_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array
                 ) -> tuple[jax.Array | None, jax.Array]:
        cfg = self.config
        attention = functools.partial(JointAttention, cfg.num_attention_heads,
                                      cfg.attention_head_dim, cfg.qk_norm, dtype=self.dtype,
                                      attention_impl=self.attention_impl)
        norm1 = AdaLayerNormZero(self.use_dual_attention, self.dtype, name="norm1")(x, temb)
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1[:5]
        if self.context_pre_only:
            norm_context = AdaLayerNormContinuous(self.dtype, name="norm1_context")(context, temb)
        else:
            (norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp,
             c_gate_mlp) = AdaLayerNormZero(dtype=self.dtype, name="norm1_context")(context, temb)

        attn_out, context_attn_out = attention(context_pre_only=self.context_pre_only,
                                               name="attn")(norm_x, norm_context)
        x = x + gate_msa * attn_out
        if self.use_dual_attention:
            norm_x2, gate_msa2 = norm1[5:]
            x = x + gate_msa2 * attention(context_pre_only=None, name="attn2")(norm_x2)
        h = plain_layer_norm("norm2", self.dtype)(x) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * TanhGELUFeedForward(self.dtype, name="ff")(h)
        if self.context_pre_only:
            return None, x

        context = context + c_gate_msa * context_attn_out
        h = plain_layer_norm("norm2_context", self.dtype)(context) * (1 + c_scale_mlp) + c_shift_mlp
        context = context + c_gate_mlp * TanhGELUFeedForward(self.dtype, name="ff_context")(h)
        return context, x


def check_sample_shape(config: SD3TransformerConfig, shape: tuple[int, ...]) -> None:
    """Raises a ValueError unless `shape` is a [B, H, W, in_channels] the model can take."""
    if len(shape) != 4 or shape[-1] != config.in_channels:
        raise ValueError(f"SD3 transformer latents must be [batch, height, width, "
                         f"{config.in_channels}] (NHWC), got shape {tuple(shape)}")
    p, limit = config.patch_size, config.pos_embed_max_size
    if shape[1] % p or shape[2] % p:
        raise ValueError(f"SD3 transformer latent size {shape[1]}x{shape[2]} is not a multiple "
                         f"of patch_size={p}")
    if shape[1] // p > limit or shape[2] // p > limit:
        raise ValueError(f"SD3 transformer latent size {shape[1]}x{shape[2]} is larger than "
                         f"the position grid: at most {limit * p} per side "
                         f"(pos_embed_max_size={limit} patches of {p})")


class SD3Transformer2DModel(nn.Module):
    """Velocity v(x_t, t, text): [B, H, W, in_channels] latents, [B] or scalar timesteps
    (sigma * 1000), [B, L, joint_attention_dim] text context, [B, pooled_projection_dim]
    pooled embedding -> [B, H, W, out_channels] float32.

    `remat_policy` names a `jax.checkpoint_policies` policy applied to each joint block (None:
    no rematerialisation); `attention_impl` as `layers.dot_product_attention` takes it.
    """

    config: SD3TransformerConfig
    dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array | float,
                 encoder_hidden_states: jax.Array, pooled_projections: jax.Array) -> jax.Array:
        cfg = self.config
        check_sample_shape(cfg, hidden_states.shape)
        context_shape = encoder_hidden_states.shape
        if len(context_shape) != 3 or context_shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [batch, tokens, "
                             f"{cfg.joint_attention_dim}], got shape "
                             f"{tuple(context_shape)}")
        if pooled_projections.shape != (hidden_states.shape[0], cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [batch, {cfg.pooled_projection_dim}], "
                             f"got shape {tuple(pooled_projections.shape)}")
        block = remat(JointTransformerBlock, self.remat_policy)

        b, height, width, _ = hidden_states.shape
        p = cfg.patch_size
        x = PatchEmbed(cfg, self.dtype, name="pos_embed")(hidden_states)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        temb = CombinedTimestepTextProjEmbeddings(cfg.inner_dim, self.dtype,
                                                  name="time_text_embed")(
            timestep, pooled_projections)
        context = dense(cfg.caption_projection_dim, name="context_embedder",
                        dtype=self.dtype)(encoder_hidden_states)
        for i in range(cfg.num_layers):
            context, x = block(cfg, i == cfg.num_layers - 1, i in cfg.dual_attention_layers,
                               self.dtype, self.attention_impl,
                               name=f"transformer_blocks_{i}")(x, context, temb)

        x = AdaLayerNormContinuous(self.dtype, name="norm_out")(x, temb)
        x = dense(p * p * cfg.out_channels, name="proj_out", dtype=self.dtype)(x)
        # Unpatchify: token (i, j)'s features are its patch as (row, column, channel).
        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, height, width, cfg.out_channels).astype(jnp.float32)


@jax.jit  # one compiled init: op-by-op initialisation dispatches thousands of ops
def init_params(config: SD3TransformerConfig, rng: jax.Array) -> dict:
    """Freshly initialised params on the smallest input (one patch, one text token);
    `jax.eval_shape(init_params, config, rng)` gives the shapes."""
    p = config.patch_size
    return SD3Transformer2DModel(config).init(
        rng, jnp.zeros((1, p, p, config.in_channels)), jnp.zeros((1,)),
        jnp.zeros((1, 1, config.joint_attention_dim)),
        jnp.zeros((1, config.pooled_projection_dim)))["params"]


def denoise(model: SD3Transformer2DModel, params: dict, x: jax.Array, t: jax.Array,
            cond: dict) -> jax.Array:
    """The system's denoiser call: the joint attention reads cond["context"] (CLIP and T5
    tokens), the conditioning vector cond["pooled"]."""
    return model.apply({"params": params}, x, t, cond["context"], cond["pooled"])

"""Building blocks shared by the models: the U-Net and the VAE, the Flux and SD3 transformers.

Layout is NHWC throughout (XLA's native convolution layout on every backend). Parameters are
float32; `dtype` is the compute dtype. Submodule names follow the diffusers PyTorch modules,
with a list index `i` written as `name_i` (`resnets_0`, `to_out_0`, `net_2`), so converting
weights is a mechanical rename (see `convert/torch_params.py`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


class TokenDense(nn.Dense):
    """nn.Dense (same params) applied to the leading axes flattened into one: the kernel
    gradient of a [B, T, C] input contracts B and T, and XLA CPU lays that dot out badly
    (the U-Net's GEGLU feed-forward, forward + backward at [8, 1024, 64]: 79 -> 57 ms,
    BENCHMARKS.md)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim <= 2:
            return super().__call__(x)
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.features)


def dense(features: int, *, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return TokenDense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


def conv(features: int, kernel: int, *, name: str, dtype: Dtype, stride: int = 1,
         padding: Any = None) -> nn.Conv:
    # Explicit symmetric padding: 'SAME' pads (0, 1) for stride 2, PyTorch pads (1, 1).
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def group_norm(groups: int, eps: float, *, name: str, dtype: Dtype) -> nn.GroupNorm:
    # Two-pass variance: the fast E[x^2]-E[x]^2 form loses digits against PyTorch.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim], float32."""
    half = dim // 2
    # The frequencies are constants: computed on the host and correctly rounded, as torch's
    # exp nearly always is (XLA's float32 exp is off by an ulp in ~1 of 10, which times
    # SDXL's size numbers ~1000 moves the angles by 1e-4).
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
                / np.float32(half - freq_shift))
    frequencies = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = jnp.asarray(timesteps, jnp.float32)[:, None] * frequencies[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, name="linear_1", dtype=self.dtype)(x)
        return dense(self.features, name="linear_2", dtype=self.dtype)(nn.silu(x))


# Attention-score elements one chunk of the chunked attention holds: 4 MiB of float32, so the
# scores of a chunk stay in cache between the two matmuls and the softmax.
ATTENTION_CHUNK_ELEMENTS = 2 ** 20


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, limit))


@jax.custom_vjp
def _attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q k^T on [N, T, d] x [N, S, d] -> float32 [N, T, S]."""
    return jnp.einsum("ntd,nsd->nts", q, k, preferred_element_type=jnp.float32)


def _attention_scores_fwd(q, k):
    return _attention_scores(q, k), (q, k)


def _attention_scores_bwd(residuals, grad):
    q, k = residuals
    dq = jnp.einsum("nts,nsd->ntd", grad, k, preferred_element_type=jnp.float32)
    # dk = grad^T q contracts T, the major axis of the wide [T, S] cotangent. XLA CPU (Eigen)
    # packs such a transposed operand at ~7 GFLOP/s; (q^T grad)^T, the same sums with the
    # narrow operand transposed instead, runs 5x faster (self-attention fwd + bwd -40%).
    dk = jnp.einsum("ntd,nts->nds", q, grad, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), jnp.swapaxes(dk, 1, 2).astype(k.dtype)


_attention_scores.defvjp(_attention_scores_fwd, _attention_scores_bwd)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v on [N, T, d] / [N, S, d] with float32 scores; normalises the [T, d]
    output rather than the [T, S] probabilities (one pass less over the big array)."""
    scores = _attention_scores(q, k)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("nts,nsd->ntd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention on [B, T, heads, d] computed a cache-sized chunk at a time.

    XLA on CPU runs each op over the whole [B, heads, T, S] score array before the next, so
    at 64x64 latents the scores stream through memory several times; this maps over groups
    of (batch, head) rows and, where one row is still too big, over query blocks, so every
    chunk's scores stay in cache (10x faster than jax.nn.dot_product_attention at
    T = S = 1024 on CPU). The backward recomputes each chunk's scores, as flash attention
    does, instead of storing them all.
    """
    b, t, heads, d = q.shape
    s = k.shape[1]
    rows = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * heads, x.shape[1], d)
    q, k, v = rows(q * jnp.asarray(d ** -0.5, q.dtype)), rows(k), rows(v)
    block = _largest_divisor(t, ATTENTION_CHUNK_ELEMENTS // s)  # query rows per chunk
    group = _largest_divisor(b * heads, ATTENTION_CHUNK_ELEMENTS // (block * s))

    def attend_group(qkv):
        qg, kg, vg = qkv
        if block == t:
            return _softmax_attention(qg, kg, vg)
        q_blocks = qg.reshape(group, t // block, block, d).swapaxes(0, 1)
        out = jax.lax.map(lambda qb: _softmax_attention(qb, kg, vg), q_blocks)
        return out.swapaxes(0, 1).reshape(group, t, d)

    groups = b * heads // group
    if groups == 1 and block == t:
        out = attend_group((q, k, v))
    else:
        split = lambda x: x.reshape(groups, group, *x.shape[1:])
        out = jax.lax.map(jax.checkpoint(attend_group), (split(q), split(k), split(v)))
    return jnp.transpose(out.reshape(b, heads, t, d), (0, 2, 1, 3))


ATTENTION_IMPLEMENTATIONS = ("chunked", "splash", "xla", "cudnn")
SPLASH_BLOCK = 128  # the splash kernel's tile: sequences padded to it, head dims to lanes


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention on [B, T, heads, d] through the Pallas splash-attention kernel that ships
    with jax (TPU's flash attention; on other backends it runs in Pallas interpret mode,
    which is slow and there for tests). Sequences are padded to the kernel's tile with the
    padded keys in a segment of their own (so no query attends to them) and head dims to 128
    lanes with zeros (which change no score); the scale is applied to q before the kernel.
    The kernel sees one example: it is vmapped over the batch, so under batch sharding each
    device runs it on its rows once the caller maps it over the mesh (shard_map)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, heads, d = q.shape
    s = k.shape[1]
    up = lambda n, m: -(-n // m) * m
    t_pad, s_pad, d_pad = up(t, SPLASH_BLOCK), up(s, SPLASH_BLOCK), up(d, 128)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_pad - d))
                               ).transpose(0, 2, 1, 3)  # [B, heads, N, d_pad]
    q, k, v = pad(q * jnp.asarray(d ** -0.5, q.dtype), t_pad), pad(k, s_pad), pad(v, s_pad)
    block = SPLASH_BLOCK
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.FullMask((t_pad, s_pad))] * heads), head_shards=1,
        q_seq_shards=1, interpret=jax.default_backend() != "tpu",
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block,
                                  block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block))
    segments = sk.SegmentIds(q=jnp.zeros((t_pad,), jnp.int32),
                             kv=(jnp.arange(s_pad) >= s).astype(jnp.int32))
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :t, :, :d]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int,
                          upcast: bool = False, is_causal: bool = False,
                          implementation: str | None = None) -> jax.Array:
    """Multi-head attention on [B, T, heads * d] projections.

    `implementation`: "chunked" (`chunked_attention`, the fast one on CPU), "splash"
    (`splash_attention`, the Pallas kernel for TPU), or "xla" / "cudnn" for
    jax.nn.dot_product_attention (cuDNN flash attention on GPU for bf16/fp16).
    None picks "chunked" on CPU and lets jax.nn.dot_product_attention choose elsewhere;
    causal attention (the text tower) always goes to jax.nn.dot_product_attention.
    `upcast` runs the attention in float32, as SD 2.x's `upcast_attention` asks.
    """
    if implementation not in (None, *ATTENTION_IMPLEMENTATIONS):
        raise ValueError(f"attention implementation {implementation!r} is not one of "
                         f"None, {', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
    if is_causal and implementation in ("chunked", "splash"):
        raise ValueError(f"{implementation} attention has no causal mask; use "
                         "implementation=None or 'xla'")
    out_dtype = q.dtype
    split = lambda x: x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)
    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if implementation is None and jax.default_backend() == "cpu" and not is_causal:
        implementation = "chunked"
    if implementation == "chunked":
        out = chunked_attention(q, k, v)
    elif implementation == "splash":
        out = splash_attention(q, k, v)
    else:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                           implementation=implementation)
    return out.reshape(*out.shape[:-2], -1).astype(out_dtype)


class Attention(nn.Module):
    """diffusers `Attention`: to_q/to_k/to_v projections, attention, to_out.0 projection.

    Self-attention when `context` is None, cross-attention on `context` otherwise.
    """

    heads: int
    dim_head: int
    out_features: int
    qkv_bias: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.dim_head
        proj = functools.partial(dense, inner, dtype=self.dtype, use_bias=self.qkv_bias)
        q = proj(name="to_q")(x)
        k = proj(name="to_k")(context)
        v = proj(name="to_v")(context)
        out = dot_product_attention(q, k, v, heads=self.heads, upcast=self.upcast,
                                    implementation=self.attention_impl)
        return dense(self.out_features, name="to_out_0", dtype=self.dtype)(out)


class GEGLU(nn.Module):
    """Gated GELU input projection of the transformer feed-forward (Shazeer 2020)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(dense(2 * self.features, name="proj", dtype=self.dtype)(x), 2, -1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU: net.0 (GEGLU), net.1 (dropout, absent), net.2 (out)."""

    features: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = GEGLU(self.features * self.mult, dtype=self.dtype, name="net_0")(x)
        return dense(self.features, name="net_2", dtype=self.dtype)(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added between (U-Net only)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", dtype=self.dtype)(x))
        h = conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(h)
        if temb is not None:
            t = dense(self.out_channels, name="time_emb_proj", dtype=self.dtype)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", dtype=self.dtype)(h))
        h = conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        return x.astype(h.dtype) + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE pads (0, 1) on each spatial axis, the U-Net (1, 1)."""

    out_channels: int
    asymmetric_padding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_padding else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, stride=2, padding=padding, name="conv",
                    dtype=self.dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype)(x)


# ----------------------------------------------------------------------------- rematerialisation

REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def remat(block: type[nn.Module], policy_name: str | None) -> type[nn.Module]:
    """`block` rematerialised under a `jax.checkpoint_policies` policy (None: as it is)."""
    if policy_name is None:
        return block
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {policy_name!r} is not a jax.checkpoint_policies policy; "
                         f"valid: None (no remat) or one of {list(REMAT_POLICIES)}")
    return nn.remat(block, policy=getattr(jax.checkpoint_policies, policy_name))


# ----------------------------------------------------------------------------- DiT pieces
# What diffusers' Flux and SD3 transformers share (diffusers/models/normalization.py,
# attention.py): eps 1e-6 norms, the output AdaLN, the tanh-GELU feed-forward.

DIT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """diffusers / torch `RMSNorm` over the last axis (weight, no bias); statistics in float32."""

    epsilon: float = DIT_NORM_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (weight * x32).astype(self.dtype)


def plain_layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    """nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6): no params."""
    return nn.LayerNorm(epsilon=DIT_NORM_EPS, use_scale=False, use_bias=False, dtype=dtype,
                        use_fast_variance=False, name=name)


class AdaLayerNormContinuous(nn.Module):
    """diffusers `AdaLayerNormContinuous` (no affine norm): LayerNorm(x) (1 + scale) + shift,
    (scale, shift) = linear(SiLU(cond)) in that order."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        emb = dense(2 * x.shape[-1], name="linear", dtype=self.dtype)(nn.silu(cond))
        scale, shift = jnp.split(emb, 2, axis=-1)
        return plain_layer_norm("norm", self.dtype)(x) * (1 + scale[:, None]) + shift[:, None]


class TanhGELU(nn.Module):
    """diffusers `GELU(approximate="tanh")`: its Linear is `proj`."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(dense(self.features, name="proj", dtype=self.dtype)(x), approximate=True)


class TanhGELUFeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: net.0.proj (4x wide) ->
    tanh GELU -> net.2, back to the input width."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        h = TanhGELU(4 * features, self.dtype, name="net_0")(x)
        return dense(features, name="net_2", dtype=self.dtype)(h)


"""The T5 v1.1 text encoder of Flux.1 and SD3: transformers `T5EncoderModel`.

A pre-RMSNorm transformer over token ids with no absolute positions: the first layer's
self-attention learns a bias per (relative-position bucket, head), and every layer adds that
same bias to its attention scores, which are not scaled by 1/sqrt(d_kv). The feed-forward is
gated GELU (tanh approximation, transformers' "gelu_new"), all projections are bias-free, and
the output goes through `final_layer_norm`. Flux.1 and SD3 use google/t5-v1_1-xxl's encoder
(`configs/t5.py`: 24 layers, 4096 wide, 4,762,310,656 parameters).

Submodule names follow transformers (`encoder/block_3/layer_1/DenseReluDense/wi_0`, ...), so
the mapping is `convert/torch_params.py`'s rename: `encoder.block.3.layer.1.DenseReluDense.
wi_0.weight`. `encoder.embed_tokens.weight` is tied to `shared.weight` (one tensor, counted
once; transformers' safetensors files keep `shared.weight` and may carry the tied copy too):

    state_dict_to_params(sd, template, ignore=[r"^encoder\\.embed_tokens\\.weight$"])

float16 is refused: T5 v1.1's activations overflow it (transformers clamps them to keep
fp16 finite); float32 and bfloat16 compute are supported, params are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# T5's LayerNorm is an RMS norm (no mean subtraction, no bias, statistics in float32).
from diffusion_jax.models.layers import RMSNorm, dense

Dtype = Any

# transformers' T5Config.feed_forward_proj values supported, with the activation
# (`dense_act_fn`) each implies: v1.1's "gated-gelu" means the tanh approximation.
FEED_FORWARD_ACTIVATIONS = {
    "gated-gelu": functools.partial(jax.nn.gelu, approximate=True),
}
_MODEL_TYPES = ("t5",)
COMPUTE_DTYPES = (jnp.float32, jnp.bfloat16)


@jax.tree_util.register_static  # a pytree without leaves: passes through jit / eval_shape
@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder's fields of transformers `T5Config` (defaults: T5Config's own, except
    feed_forward_proj, whose default "relu" is T5 v1.0's)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"T5Config: feed_forward_proj={self.feed_forward_proj!r} is not "
                             f"supported; supported: {sorted(FEED_FORWARD_ACTIVATIONS)} "
                             "(T5 v1.1).")

    # What a system reads of any text tower's config (see models/__init__.py).
    @property
    def output_widths(self) -> dict[str, int]:
        return {"last_hidden_state": self.d_model}

    @property
    def max_tokens(self) -> int:
        # No learned positions: distances past relative_attention_max_distance share a bucket,
        # so any length runs (Flux reads 512 tokens, SD3 256).
        return sys.maxsize

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        """From a transformers `text_encoder_2/config.json` (Flux) or `text_encoder_3/` (SD3)
        dict. Decoder keys, `dropout_rate` (training only; this encoder has no dropout) and
        the `dense_act_fn` / `is_gated_act` that feed_forward_proj implies are ignored."""
        model_type = d.get("model_type", "t5")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"T5Config: model_type={model_type!r} is not supported; "
                             f"supported: {list(_MODEL_TYPES)}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """transformers' bidirectional `_relative_position_bucket` of key - query positions,
    [query_length, key_length] int32: half the buckets for keys after the query; in each half,
    exact distances below num_buckets / 4, then logarithmic bins up to max_distance.

    Computed on the host in float32 as torch computes it: the log-bin boundaries fall on
    integers (distance 64 of 128 is exactly bin 6 in real arithmetic), where another rounding
    would move a distance to the next bucket.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) at distance 0 is not selected
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(half - max_exact))
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5Attention(nn.Module):
    """Bidirectional self-attention without scaling; the first layer's
    (`has_relative_attention_bias`) computes the position bias that all layers add."""

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 position_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        proj = functools.partial(dense, inner, dtype=self.dtype, use_bias=False)
        split = lambda y: y.reshape(*y.shape[:-1], cfg.num_heads, cfg.d_kv)
        q, k, v = (split(proj(name=n)(x)) for n in ("q", "k", "v"))
        if position_bias is None:
            seq_len = x.shape[-2]
            buckets = relative_position_buckets(seq_len, seq_len,
                                                cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                            param_dtype=jnp.float32, name="relative_attention_bias")(buckets)
            position_bias = jnp.transpose(bias, (2, 0, 1))[None]  # [1, heads, T, S], float32
        # jax.nn.dot_product_attention: float32 scores and softmax for bf16 inputs too; the
        # bias and padding mask keep this off the chunked CPU path of layers.py.
        out = jax.nn.dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0)
        out = out.reshape(*out.shape[:-2], inner).astype(self.dtype)
        return dense(cfg.d_model, name="o", dtype=self.dtype, use_bias=False)(out), position_bias


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias):
        normed = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        out, position_bias = T5Attention(self.config, self.has_relative_attention_bias,
                                         self.dtype, name="SelfAttention")(normed, mask,
                                                                           position_bias)
        return x + out, position_bias


class T5DenseGatedActDense(nn.Module):
    """act(wi_0 x) * wi_1 x, then wo."""

    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        proj = functools.partial(dense, dtype=self.dtype, use_bias=False)
        act = FEED_FORWARD_ACTIVATIONS[cfg.feed_forward_proj]
        hidden = act(proj(cfg.d_ff, name="wi_0")(x)) * proj(cfg.d_ff, name="wi_1")(x)
        return proj(cfg.d_model, name="wo")(hidden)


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        normed = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return x + T5DenseGatedActDense(self.config, self.dtype, name="DenseReluDense")(normed)


class T5Block(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        # A list attribute: Flax names the entries `layer_0`, `layer_1`, as transformers'
        # ModuleList `layer`.
        self.layer = [T5LayerSelfAttention(self.config, self.has_relative_attention_bias,
                                           self.dtype),
                      T5LayerFF(self.config, self.dtype)]

    def __call__(self, x, mask, position_bias):
        x, position_bias = self.layer[0](x, mask, position_bias)
        return self.layer[1](x), position_bias


class T5Stack(nn.Module):
    """transformers' encoder `T5Stack` after its (tied) embedding: the blocks and
    `final_layer_norm`."""

    config: T5Config
    dtype: Dtype = jnp.float32

    def setup(self):
        self.block = [T5Block(self.config, i == 0, self.dtype)
                      for i in range(self.config.num_layers)]
        self.final_layer_norm = RMSNorm(self.config.layer_norm_epsilon, self.dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        position_bias = None
        for block in self.block:
            x, position_bias = block(x, mask, position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """transformers `T5EncoderModel`. The output is float32 whatever the compute dtype."""

    config: T5Config
    dtype: Dtype = jnp.float32

    def setup(self):
        if jnp.dtype(self.dtype) not in COMPUTE_DTYPES:
            raise ValueError(f"T5EncoderModel: dtype={jnp.dtype(self.dtype).name} is not "
                             "supported; supported: float32, bfloat16 (T5 v1.1 overflows "
                             "float16).")
        self.shared = nn.Embed(self.config.vocab_size, self.config.d_model, dtype=self.dtype,
                               param_dtype=jnp.float32)
        self.encoder = T5Stack(self.config, self.dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids: [B, T] int; attention_mask: [B, T] (1: token, 0: padding) or None (all
        positions attended, as Flux and SD3 pipelines run it). Returns last_hidden_state
        [B, T, d_model] float32."""
        mask = None
        if attention_mask is not None:
            mask = (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, S]: keys
        return self.encoder(self.shared(input_ids), mask).astype(jnp.float32)


@jax.jit  # one compiled init: op-by-op initialisation dispatches thousands of ops
def init_params(config: T5Config, rng: jax.Array) -> dict:
    """Freshly initialised params; `jax.eval_shape(init_params, config, rng)` gives the shapes."""
    return T5EncoderModel(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def encode_text(model: T5EncoderModel, params: dict, ids: jax.Array) -> dict[str, jax.Array]:
    """{"last_hidden_state": [B, T, d_model]}, every position attended, padding included: the
    prompt embeddings diffusers' Flux and SD3 pipelines compute (they pass no attention mask)."""
    return {"last_hidden_state": model.apply({"params": params}, ids)}

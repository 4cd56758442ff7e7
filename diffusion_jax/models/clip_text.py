"""The CLIP text towers that condition Stable Diffusion: transformers `CLIPTextModel` and
`CLIPTextModelWithProjection`.

A pre-LayerNorm causal transformer over token ids: SD 1.x uses OpenAI's ViT-L/14 text tower
(12 layers, quick_gelu), SD 2.x OpenCLIP ViT-H/14's without its last block (23 layers, gelu).
Submodule names follow transformers (`encoder/layers_3/self_attn/q_proj`, ...). Released SD
text encoders (saved by transformers 4) prefix every key with `text_model.` and may hold a
`position_ids` buffer; transformers 5 keeps and saves the keys without the prefix:

    state_dict_to_params(sd, template, prefix="text_model.", ignore=[r"position_ids$"])

The transformer encoder (`CLIPEncoder`: attention, MLP, pre-LN layers) is shared with the
vision tower (`clip_vision.py`), which runs it without the causal mask.

SDXL's second tower, OpenCLIP ViT-bigG/14's text model (32 layers), is a
`CLIPTextModelWithProjection`: the text model under `text_model` plus a bias-free
`text_projection` of the pooled output. Its config is a `CLIPTextWithProjectionConfig` (the
config's class picks the model that `init_params` builds). transformers 4 and 5 both key it
`text_model.*` and `text_projection.weight`, which is this param tree's naming as it is:

    state_dict_to_params(sd, template, ignore=[r"position_ids$"])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import dense, dot_product_attention

Dtype = Any

# transformers names of the supported activations (ACT2FN): OpenAI CLIP's sigmoid
# approximation, and the exact erf GELU of OpenCLIP.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}

# Before transformers PR #24773 CLIP configs carried eos_token_id=2 (SD 1.x and 2.x still do);
# for those, transformers pools at argmax(input_ids), which is the EOS id 49407 in CLIP's vocab.
LEGACY_EOS_TOKEN_ID = 2

# Dropout keys must be zero: these models have no dropout (SD keeps its text tower frozen).
_ZERO_KEYS = ("dropout", "attention_dropout")
_MODEL_TYPES = ("clip_text_model", "clip")


def check_encoder_config(config: Any) -> None:
    """What `CLIPEncoder` needs of a text or vision config: a supported activation and whole
    attention heads."""
    name = type(config).__name__
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{name}: hidden_act={config.hidden_act!r} is not supported; "
                         f"supported: {sorted(ACTIVATIONS)}.")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{name}: hidden_size={config.hidden_size} is not divisible "
                         f"by num_attention_heads={config.num_attention_heads}.")


def config_fields(cls: type, d: Mapping[str, Any], model_types: tuple[str, ...]) -> dict:
    """The keys of a transformers config dict that dataclass `cls` has, after checking its
    model_type and that it asks for no dropout. Keys that do not change the network
    (`architectures`, `initializer_range`, `torch_dtype`, ...) are dropped."""
    model_type = d.get("model_type", model_types[0])
    if model_type not in model_types:
        raise ValueError(f"{cls.__name__}: model_type={model_type!r} is not supported; "
                         f"supported: {list(model_types)}.")
    for key in _ZERO_KEYS:
        if d.get(key, 0.0):
            raise ValueError(f"{cls.__name__}: {key}={d[key]!r} is not supported; "
                             "supported: 0.0 (no dropout).")
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in fields}


@jax.tree_util.register_static  # a pytree without leaves: passes through jit / eval_shape
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers `CLIPTextConfig` (defaults: SD 1.x, OpenAI CLIP ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    pad_token_id: int = 1
    projection_dim: int = 768  # only CLIPTextModelWithProjection uses it; kept for export

    def __post_init__(self):
        check_encoder_config(self)
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"CLIPTextConfig: eos_token_id={self.eos_token_id!r} is not "
                             "supported; supported: a single int.")

    # What a system reads of any text tower's config (see models/__init__.py).
    @property
    def output_widths(self) -> dict[str, int]:
        """Feature width of each output `encode_text` gives."""
        return {"last_hidden_state": self.hidden_size,
                "penultimate_hidden_state": self.hidden_size,
                "pooler_output": self.hidden_size}

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers `text_encoder/config.json` dict: a `CLIPTextModel` config, or a
        `CLIPConfig` with the text tower under `text_config`. Keys that do not change the
        network (`architectures`, `initializer_range`, `torch_dtype`, ...) are ignored."""
        if "text_config" in d:
            d = d["text_config"]
        return cls(**config_fields(cls, d, _MODEL_TYPES))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """The config of a `CLIPTextModelWithProjection` (transformers has one `CLIPTextConfig` for
    both models; here the class tells them apart). projection_dim is the width of
    `text_embeds`."""

    @property
    def output_widths(self) -> dict[str, int]:
        return {**super().output_widths, "text_embeds": self.projection_dim}


@flax.struct.dataclass
class CLIPTextOutput:
    """As transformers' `BaseModelOutputWithPooling` with `output_hidden_states=True`.

    last_hidden_state: [B, T, D], after final_layer_norm.
    pooler_output: [B, D], last_hidden_state at each sequence's EOS token.
    hidden_states: num_hidden_layers + 1 arrays [B, T, D]: the embeddings, then each layer's
      output, none with final_layer_norm (so hidden_states[-1] != last_hidden_state).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]


@flax.struct.dataclass
class CLIPTextWithProjectionOutput(CLIPTextOutput):
    """`CLIPTextOutput` plus transformers' `text_embeds`: [B, projection_dim], the projected
    pooler_output (SDXL's pooled conditioning). transformers' `CLIPTextModelOutput` has no
    pooler_output; it is kept here, unprojected."""

    text_embeds: jax.Array


def layer_norm(config: Any, name: str, dtype: Dtype) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch: the E[x^2]-E[x]^2 form loses digits on the residual stream.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {seq_len} exceeds "
                             f"max_position_embeddings={cfg.max_position_embeddings}.")
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype,
                                  param_dtype=jnp.float32)
        tokens = embed(cfg.vocab_size, name="token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, name="position_embedding")(
            jnp.arange(seq_len))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; causal for text."""

    config: Any  # CLIPTextConfig or CLIPVisionConfig: the fields check_encoder_config reads
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        proj = functools.partial(dense, self.config.hidden_size, dtype=self.dtype)
        q, k, v = proj(name="q_proj")(x), proj(name="k_proj")(x), proj(name="v_proj")(x)
        # No padding mask: SD conditions on all 77 positions, padding included, and the causal
        # mask already keeps every token before the first EOS blind to the padding.
        out = dot_product_attention(q, k, v, heads=self.config.num_attention_heads,
                                    is_causal=self.causal)
        return proj(name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = dense(cfg.intermediate_size, name="fc1", dtype=self.dtype)(x)
        return dense(cfg.hidden_size, name="fc2", dtype=self.dtype)(ACTIVATIONS[cfg.hidden_act](x))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: Any
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = x + CLIPAttention(cfg, self.dtype, self.causal, name="self_attn")(
            layer_norm(cfg, "layer_norm1", self.dtype)(x))
        return x + CLIPMLP(cfg, self.dtype, name="mlp")(
            layer_norm(cfg, "layer_norm2", self.dtype)(x))


class CLIPEncoder(nn.Module):
    """The layers of either tower: causal for text, bidirectional (causal=False) for images."""

    config: Any
    dtype: Dtype = jnp.float32
    causal: bool = True

    def setup(self):
        # A list attribute: Flax names the entries `layers_0`, `layers_1`, ...
        self.layers = [CLIPEncoderLayer(self.config, self.dtype, self.causal)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, num_layers: int | None = None) -> tuple[jax.Array, ...]:
        """The input and the output of each of the first `num_layers` layers (default: all)."""
        states = [x]
        for layer in self.layers[:num_layers]:
            states.append(layer(states[-1]))
        return tuple(states)


class CLIPTextModel(nn.Module):
    """transformers `CLIPTextModel` (the `text_model` inside it). Outputs are float32
    whatever the compute dtype: they are small and feed the U-Net's cross-attention."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype, causal=True)
        self.final_layer_norm = layer_norm(self.config, "final_layer_norm", self.dtype)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids: [B, T] int, T <= max_position_embeddings."""
        hidden_states = self.encoder(self.embeddings(input_ids))
        last = self.final_layer_norm(hidden_states[-1])
        batch = jnp.arange(input_ids.shape[0])
        pooled = last[batch, eos_positions(input_ids, self.config.eos_token_id)]
        f32 = lambda x: x.astype(jnp.float32)
        return CLIPTextOutput(last_hidden_state=f32(last), pooler_output=f32(pooled),
                              hidden_states=tuple(map(f32, hidden_states)))

    def layer_output_with_final_norm(self, input_ids: jax.Array, layer: int) -> jax.Array:
        """`final_layer_norm(hidden_states[layer])`, [B, T, D] float32: the clip-skip
        conditioning. `layer` indexes `CLIPTextOutput.hidden_states` (0: embeddings,
        num_hidden_layers: last layer; negative counts from the end), so diffusers'
        `clip_skip=n` is `layer=-(n + 1)` and `layer=-1` equals `last_hidden_state`. Layers
        after `layer` are not run.

        (SD 2.x's "penultimate layer" is already built into its 23-layer diffusers text
        encoder: it uses `last_hidden_state`, i.e. layer=-1.)
        """
        num_layers = self.config.num_hidden_layers
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"CLIPTextModel: layer={layer} is out of range for "
                             f"{num_layers} layers (valid: {-num_layers - 1}..{num_layers}).")
        hidden = self.encoder(self.embeddings(input_ids), num_layers=index)[-1]
        return self.final_layer_norm(hidden).astype(jnp.float32)


class CLIPTextModelWithProjection(nn.Module):
    """transformers `CLIPTextModelWithProjection`: `CLIPTextModel` under `text_model`, and
    `text_projection` (hidden_size -> projection_dim, no bias) of its pooled output."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextModel(self.config, self.dtype)
        self.text_projection = dense(self.config.projection_dim, name="text_projection",
                                     dtype=self.dtype, use_bias=False)

    def __call__(self, input_ids: jax.Array) -> CLIPTextWithProjectionOutput:
        """input_ids: [B, T] int, T <= max_position_embeddings."""
        out = self.text_model(input_ids)
        text_embeds = self.text_projection(out.pooler_output)
        return CLIPTextWithProjectionOutput(
            last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
            hidden_states=out.hidden_states, text_embeds=text_embeds.astype(jnp.float32))

    def layer_output_with_final_norm(self, input_ids: jax.Array, layer: int) -> jax.Array:
        """As `CLIPTextModel.layer_output_with_final_norm`."""
        return self.text_model.layer_output_with_final_norm(input_ids, layer)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token the pooled output is taken at, per sequence: [B] int.

    transformers' rule: for the legacy eos_token_id=2, the position of the largest id (EOS is
    the largest id in CLIP's vocabulary); otherwise the first position holding eos_token_id
    (0 when there is none). Both take the first occurrence, so EOS-padded prompts pool at the
    real end of text.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def model_class(config: CLIPTextConfig) -> type[nn.Module]:
    """The model a config describes: `CLIPTextModelWithProjection` for a
    `CLIPTextWithProjectionConfig`, else `CLIPTextModel`."""
    if isinstance(config, CLIPTextWithProjectionConfig):
        return CLIPTextModelWithProjection
    return CLIPTextModel


@jax.jit  # one compiled init: op-by-op initialisation dispatches thousands of ops
def init_params(config: CLIPTextConfig, rng: jax.Array) -> dict:
    """Freshly initialised params of `model_class(config)`; `jax.eval_shape(init_params,
    config, rng)` gives the shapes."""
    input_ids = jnp.zeros((1, 1), jnp.int32)
    return model_class(config)(config).init(rng, input_ids)["params"]


def encode_text(model: CLIPTextModel | CLIPTextModelWithProjection, params: dict,
                ids: jax.Array) -> dict[str, jax.Array]:
    """The outputs a system's text tower can contribute to the conditioning, by name (the
    keys of its config's `output_widths`):

    last_hidden_state: [B, T, hidden], after final_layer_norm;
    penultimate_hidden_state: [B, T, hidden], hidden_states[-2] (the output of the
      second-to-last layer), without final_layer_norm: SDXL's context (diffusers
      `hidden_states[-2]`);
    pooler_output: [B, hidden], last_hidden_state at EOS;
    text_embeds (with projection only): [B, projection_dim], pooler_output projected: SDXL's
      pooled conditioning.
    """
    out = model.apply({"params": params}, ids)
    outputs = {"last_hidden_state": out.last_hidden_state,
               "penultimate_hidden_state": out.hidden_states[-2],
               "pooler_output": out.pooler_output}
    if isinstance(out, CLIPTextWithProjectionOutput):
        outputs["text_embeds"] = out.text_embeds
    return outputs

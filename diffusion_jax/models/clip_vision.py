"""The CLIP image tower: transformers `CLIPVisionTransformer` (a `CLIPModel`'s `vision_model`).

A ViT: the image cut into patch_size x patch_size patches by a bias-free strided conv, a learned
class token in front, learned absolute position embeddings, `pre_layrnorm` (transformers'
spelling), the text tower's pre-LN encoder run without the causal mask (`clip_text.CLIPEncoder`),
and `post_layernorm` of the class token as the pooled output. Images are NHWC here ([B, H, W,
C], already normalised as the model's image processor says), NCHW in transformers; the conv
kernel is converted OIHW -> HWIO like every other. Submodule names follow transformers
(`embeddings/patch_embedding`, `encoder/layers_3/self_attn/q_proj`, ...), so a `CLIPModel`
state dict maps by `torch_params.state_dict_to_params` with the prefix `vision_model.`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from diffusion_jax.models.clip_text import (CLIPEncoder, check_encoder_config, config_fields,
                                            layer_norm)

Dtype = Any

_MODEL_TYPES = ("clip_vision_model", "clip")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers `CLIPVisionConfig` (its defaults: OpenAI CLIP ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_encoder_config(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size={self.image_size} is not a multiple "
                             f"of patch_size={self.patch_size}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From a `CLIPVisionModel` config dict, or a `CLIPConfig` one with the image tower
        under `vision_config`."""
        if "vision_config" in d:
            d = d["vision_config"]
        return cls(**config_fields(cls, d, _MODEL_TYPES))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@flax.struct.dataclass
class CLIPVisionOutput:
    """As transformers' `BaseModelOutputWithPooling`.

    last_hidden_state: [B, num_positions, D], the encoder's output (no final norm: transformers
      normalises only the pooled token).
    pooler_output: [B, D], post_layernorm of the class token.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (conv, no bias) with the class token in front, plus position embedding."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"CLIPVisionModel: images of shape {pixel_values.shape[1:]}, the "
                             f"model takes {(cfg.image_size, cfg.image_size, cfg.num_channels)} "
                             "(NHWC)")
        patch = (cfg.patch_size, cfg.patch_size)
        patches = nn.Conv(cfg.hidden_size, patch, strides=patch, padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=jnp.float32,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)  # row-major, as torch
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0),
                                     (cfg.hidden_size,), jnp.float32)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype),
                               (patches.shape[0], 1, cfg.hidden_size))
        positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                             param_dtype=jnp.float32, name="position_embedding")(
                                 jnp.arange(cfg.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
    """transformers `CLIPVisionTransformer`. Outputs are float32 whatever the compute dtype."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.embeddings = CLIPVisionEmbeddings(self.config, self.dtype)
        self.pre_layrnorm = layer_norm(self.config, "pre_layrnorm", self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype, causal=False)
        self.post_layernorm = layer_norm(self.config, "post_layernorm", self.dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """pixel_values: [B, image_size, image_size, num_channels] float, normalised."""
        last = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))[-1]
        pooled = self.post_layernorm(last[:, 0])
        return CLIPVisionOutput(last_hidden_state=last.astype(jnp.float32),
                                pooler_output=pooled.astype(jnp.float32))

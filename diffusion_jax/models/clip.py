"""transformers `CLIPModel`: the text and image towers with their projections into the joint
embedding space (what CLIP score measures in).

    text_model        clip_text.CLIPTextModel, pooled at EOS
    vision_model      clip_vision.CLIPVisionTransformer, pooled at the class token
    text_projection   hidden -> projection_dim, no bias
    visual_projection hidden -> projection_dim, no bias

The param tree is keyed as a `CLIPModel` state dict is (transformers 4 and 5 alike), less
`logit_scale` (the contrastive loss's temperature, not needed for embeddings) and the
`position_ids` buffers older saves hold:

    state_dict_to_params(sd, template, ignore=TORCH_IGNORE)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from diffusion_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTransformer
from diffusion_jax.models.layers import dense

Dtype = Any

TORCH_IGNORE = (r"position_ids$", r"^logit_scale$")

# transformers' CLIPTextConfig defaults, for keys a CLIPModel config.json leaves out (ours
# default to SD 1.x's text encoder, a different model).
TRANSFORMERS_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers `CLIPConfig`: the two towers' configs and the joint embedding's width."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """From a `CLIPModel` folder's config.json. Older saves hold the towers' settings in
        `text_config_dict` / `vision_config_dict` too, which win, as in transformers."""
        if d.get("model_type") != "clip" or not ({"vision_config", "vision_config_dict"} & set(d)):
            raise ValueError(f"CLIPConfig: model_type={d.get('model_type')!r}"
                             f"{'' if 'vision_config' in d else ' without vision_config'}; a "
                             "CLIPModel config has model_type 'clip' and both towers' configs")
        text = {**TRANSFORMERS_TEXT_DEFAULTS, **(d.get("text_config") or {}),
                **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return cls(text=CLIPTextConfig.from_dict(text), vision=CLIPVisionConfig.from_dict(vision),
                   projection_dim=int(d.get("projection_dim", 512)))


class CLIPModel(nn.Module):
    """transformers `CLIPModel`, without the contrastive logits: `text_features(ids)` and
    `image_features(pixels)` are `get_text_features` / `get_image_features` (projected,
    not normalised), float32."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.text_model = CLIPTextModel(self.config.text, self.dtype)
        self.vision_model = CLIPVisionTransformer(self.config.vision, self.dtype)
        self.text_projection = dense(self.config.projection_dim, name="text_projection",
                                     dtype=self.dtype, use_bias=False)
        self.visual_projection = dense(self.config.projection_dim, name="visual_projection",
                                       dtype=self.dtype, use_bias=False)

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, T] int -> [B, projection_dim]."""
        pooled = self.text_model(input_ids).pooler_output
        return self.text_projection(pooled).astype(jnp.float32)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [B, H, W, C] normalised -> [B, projection_dim]."""
        pooled = self.vision_model(pixel_values).pooler_output
        return self.visual_projection(pooled).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array):
        """(text features, image features)."""
        return self.text_features(input_ids), self.image_features(pixel_values)


@jax.jit
def init_params(config: CLIPConfig, rng: jax.Array) -> dict:
    """Freshly initialised params; `jax.eval_shape(init_params, config, rng)` gives the shapes."""
    vision = config.vision
    ids = jnp.zeros((1, 1), jnp.int32)
    pixels = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels))
    return CLIPModel(config).init(rng, ids, pixels)["params"]

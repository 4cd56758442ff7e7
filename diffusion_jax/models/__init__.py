"""The kinds of model a system is built from, by the names `system.Tower.kind` uses.

`KINDS["unet"]` etc. say where a kind's code lives (its module holds the config class, the
Linen model class, `init_params` and the functions below), the shapes of its params without
computing them, and how its PyTorch state dict is keyed. The model modules are imported on
first use, so importing `diffusion_jax.models.layers` stays light.

A kind's module provides, besides `init_params(config, rng)`, what its role needs, and its
config class the properties the system's checks and geometry read:
- a denoiser: `denoise(model, params, x, t, cond) -> prediction` (cond: the conditioning
  dict); config `in_channels`, `context_dim`, `downsampling` (latent sides' multiple),
  `sample_size`;
- a text tower: `encode_text(model, params, ids) -> {output name: array}`; config
  `output_widths` ({output name: features}), `max_tokens`;
- a VAE: `encode(model, params, images) -> posterior` and `decode(model, params, z) -> images`;
  config `latent_channels`, `downsampling_factor`;
- a ControlNet (an adapter): `control(model, params, x, t, cond, image, scale, guess_mode)
  -> {"down_residuals": ..., "mid_residual": ...}`, conditioning the denoiser reads, and
  (`starts_from_denoiser`) `params_from_unet(unet_params, config, rng)`, its fresh params
  started from the U-Net's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Mapping

import jax


@dataclasses.dataclass(frozen=True)
class Component:
    """One kind of model: where its code lives and how PyTorch names its weights."""

    kind: str
    module_path: str  # the Python module holding the config class, model class and functions
    config_class_name: str
    model_class_name: str
    torch_prefix: str = ""  # prefix of every key in the PyTorch state dict
    torch_ignore: tuple[str, ...] = ()  # regexes of PyTorch buffers that are not params
    reference_class: tuple[str, str] = ("", "")  # (library, class) of the PyTorch reference
    weights_stem: str = "diffusion_pytorch_model"  # of its weights file in a diffusers folder
    # An adapter whose fresh params start from its denoiser's (a ControlNet: the U-Net's
    # encoder half, its module's `params_from_unet`).
    starts_from_denoiser: bool = False

    def module(self):
        return importlib.import_module(self.module_path)

    def config_from_dict(self, d: Mapping[str, Any]):
        return getattr(self.module(), self.config_class_name).from_dict(dict(d))

    def build(self, config, **options):
        """The Linen module; `options` (dtype, remat_policy, ...) as its class takes them."""
        return getattr(self.module(), self.model_class_name)(config, **options)

    def param_shapes(self, config) -> dict:
        """The param tree as `jax.ShapeDtypeStruct`s: no memory, no compute."""
        return jax.tree.map(lambda x: x, _param_shapes(self.module_path, config))  # a fresh tree

    def init_params(self, config, rng: jax.Array) -> dict:
        return self.module().init_params(config, rng)

    def init_from_denoiser(self, config, denoiser_params, rng: jax.Array) -> dict:
        return self.module().params_from_unet(denoiser_params, config, rng)

    def denoise(self, model, params, x, t, cond):
        return self.module().denoise(model, params, x, t, cond)

    def control(self, model, params, x, t, cond, image, scale, guess_mode: bool = False) -> dict:
        return self.module().control(model, params, x, t, cond, image, scale, guess_mode)

    def encode_text(self, model, params, ids) -> dict:
        return self.module().encode_text(model, params, ids)

    def encode(self, model, params, images):
        return self.module().encode(model, params, images)

    def decode(self, model, params, z):
        return self.module().decode(model, params, z)


@functools.lru_cache(maxsize=16)
def _param_shapes(module_path: str, config) -> dict:
    # Tracing a model's init takes seconds (the SD U-Net); configs are frozen, so cache.
    init = functools.partial(importlib.import_module(module_path).init_params, config)
    return jax.eval_shape(init, jax.random.key(0))


KINDS: dict[str, Component] = {}


def register(component: Component) -> Component:
    """Adds a kind (new families, and tests' toy models, register theirs)."""
    KINDS[component.kind] = component
    return component


register(Component("unet", "diffusion_jax.models.unet", "UNetConfig", "UNet2DConditionModel",
                   reference_class=("diffusers", "UNet2DConditionModel")))
register(Component("controlnet", "diffusion_jax.models.controlnet", "ControlNetConfig",
                   "ControlNetModel", reference_class=("diffusers", "ControlNetModel"),
                   starts_from_denoiser=True))
register(Component("vae", "diffusion_jax.models.vae", "AutoencoderKLConfig", "AutoencoderKL",
                   reference_class=("diffusers", "AutoencoderKL")))
register(Component("clip_text", "diffusion_jax.models.clip_text", "CLIPTextConfig",
                   "CLIPTextModel", torch_prefix="text_model.", torch_ignore=(r"position_ids$",),
                   reference_class=("transformers", "CLIPTextModel"), weights_stem="model"))
# SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14): `text_model.*` and `text_projection.weight` in
# transformers 4 and 5 alike, which the param tree's own names give (no prefix).
register(Component("clip_text_projection", "diffusion_jax.models.clip_text",
                   "CLIPTextWithProjectionConfig", "CLIPTextModelWithProjection",
                   torch_ignore=(r"position_ids$",),
                   reference_class=("transformers", "CLIPTextModelWithProjection"),
                   weights_stem="model"))
# The T5 v1.1 encoder of Flux (text_encoder_2) and SD3 (text_encoder_3): `shared.weight` is
# its token embedding; transformers' tied `encoder.embed_tokens.weight`, where a file has it,
# is the same tensor.
register(Component("t5", "diffusion_jax.models.t5", "T5Config", "T5EncoderModel",
                   torch_ignore=(r"^encoder\.embed_tokens\.weight$",),
                   reference_class=("transformers", "T5EncoderModel"), weights_stem="model"))
# The Flux.1 transformer (a pipeline's `transformer` folder); it has no buffers.
register(Component("flux", "diffusion_jax.models.flux", "FluxConfig", "FluxTransformer2DModel",
                   reference_class=("diffusers", "FluxTransformer2DModel")))
# SD3 / SD3.5's denoiser (diffusers `transformer/`). `pos_embed.pos_embed` in its state dict is
# the constant sin-cos table, recomputed on the host rather than loaded.
register(Component("mmdit", "diffusion_jax.models.mmdit", "SD3TransformerConfig",
                   "SD3Transformer2DModel", torch_ignore=(r"^pos_embed\.pos_embed$",),
                   reference_class=("diffusers", "SD3Transformer2DModel")))


def count_params(tree: Any) -> int:
    """Number of scalars in a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


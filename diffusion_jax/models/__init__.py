"""The components of a Stable Diffusion system, by the names checkpoints and configs use.

`COMPONENTS["unet"]` etc. say how to build each model from its config section (diffusers /
transformers config.json key names), the shapes of its params without computing them, and how
its PyTorch state dict is keyed. The model modules are imported on first use, so importing
`diffusion_jax.models.layers` stays light.
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
    """One model of the system: where its code lives and how PyTorch names its weights."""

    name: str
    module_path: str  # the Python module holding the config class, model class and init_params
    config_class_name: str
    model_class_name: str
    torch_prefix: str = ""  # prefix of every key in the PyTorch state dict
    torch_ignore: tuple[str, ...] = ()  # regexes of PyTorch buffers that are not params

    def _module(self):
        return importlib.import_module(self.module_path)

    @property
    def config_class(self) -> type:
        return getattr(self._module(), self.config_class_name)

    @property
    def model_class(self) -> type:
        return getattr(self._module(), self.model_class_name)

    def config_from_dict(self, d: Mapping[str, Any]):
        return self.config_class.from_dict(dict(d))

    def param_shapes(self, config) -> dict:
        """The param tree as `jax.ShapeDtypeStruct`s: no memory, no compute."""
        return jax.tree.map(lambda x: x, _param_shapes(self.module_path, config))  # a fresh tree

    def init_params(self, config, rng: jax.Array) -> dict:
        return self._module().init_params(config, rng)


@functools.lru_cache(maxsize=16)
def _param_shapes(module_path: str, config) -> dict:
    # Tracing a model's init takes seconds (the SD U-Net); configs are frozen, so cache.
    init = functools.partial(importlib.import_module(module_path).init_params, config)
    return jax.eval_shape(init, jax.random.key(0))


COMPONENTS: dict[str, Component] = {
    "unet": Component("unet", "diffusion_jax.models.unet", "UNetConfig", "UNet2DConditionModel"),
    "vae": Component("vae", "diffusion_jax.models.vae", "AutoencoderKLConfig", "AutoencoderKL"),
    "text_encoder": Component("text_encoder", "diffusion_jax.models.clip_text", "CLIPTextConfig",
                              "CLIPTextModel", torch_prefix="text_model.",
                              torch_ignore=(r"position_ids$",)),
}


def count_params(tree: Any) -> int:
    """Number of scalars in a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

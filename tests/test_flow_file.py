"""Flux.1 / SD3 single files: the released models' shapes read back as their configs
(the conversions themselves are checked in test_flux_pipeline and test_sd3_pipeline)."""

from collections import defaultdict

import pytest
from flax import traverse_util

from diffusion_jax import config_files, system
from diffusion_jax.convert import flow_file
from diffusion_jax.convert.single_file import _torch_shape
from diffusion_jax.convert.torch_params import torch_key


class _Shaped:
    """A state-dict value that has a shape and no memory."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def released_shapes(layout: flow_file.FlowLayout, config) -> dict:
    """File key -> shape of the released transformer, the stacked q/k/v (and Flux's MLP
    input) summed over their parts."""
    component = layout.system.denoiser.component
    rows, rest = defaultdict(int), {}
    for path, leaf in traverse_util.flatten_dict(component.param_shapes(config)).items():
        key, transform = layout.source(torch_key(path), config)
        shape = _torch_shape(path, leaf.shape)
        if transform.__name__ == "<lambda>":  # one part of a stacked weight
            rows[key] += shape[0]
            rest[key] = shape[1:]
        else:
            rest[key] = shape
    shapes = {key: _Shaped((rows[key], *rest[key]) if key in rows else rest[key]) for key in rest}
    if layout.name == "SD3":
        shapes["pos_embed"] = _Shaped((1, config.pos_embed_max_size ** 2, config.inner_dim))
    return shapes


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell", "sd3_medium", "sd35_medium",
                                  "sd35_large"])
def test_the_released_shapes_infer_the_released_transformer(name, tmp_path):
    sections = config_files.as_dict(config_files.load(name))
    layout = next(l for l in flow_file.LAYOUTS if l.system == system.from_config(sections))
    component = layout.system.denoiser.component
    released = component.config_from_dict(sections["transformer"])
    shapes = released_shapes(layout, released)
    assert flow_file.layout_of(shapes) is layout
    # The base's section says only what weights cannot: start from the family defaults.
    inferred = flow_file.transformer_config(layout, layout.infer(shapes, tmp_path),
                                            component.config_from_dict({}).to_dict(), None,
                                            tmp_path)
    if layout.name == "SD3":
        inferred = component.config_from_dict(dict(inferred.to_dict(),
                                                   sample_size=released.sample_size))
    assert inferred == released

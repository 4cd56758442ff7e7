"""Random weights for benchmarks, made from the param shapes alone.

Flax's init runs the model op by op (or compiles it): tens of seconds for a tiny system on a
busy 2-core CPU, minutes for SD 1.5. What a benchmark needs is weights of the right shapes
and a sane scale, so they are drawn here directly: kernels LeCun-normal (Flax's default for
Dense and Conv), embeddings N(0, 0.02) (CLIP's), and biases and norm scales perturbed from 0
and 1 so that a PyTorch reference given wrongly mapped ones would not agree.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from diffusion_jax.models import KINDS


def _leaf(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    if kind == "kernel":
        return noise / np.float32(math.sqrt(math.prod(shape[:-1])))
    if kind == "embedding":
        return noise * np.float32(0.02)
    if kind == "scale":
        return 1 + np.float32(0.1) * noise
    return np.float32(0.1) * noise  # bias


def random_params(kind: str, config_section: Mapping[str, Any], seed: int) -> dict:
    """Params of a model of `kind` (a models.KINDS key: "unet", "vae", "clip_text") for a
    config section, as device arrays; the same seed gives the same weights."""
    component = KINDS[kind]
    shapes = component.param_shapes(component.config_from_dict(config_section))
    rng = np.random.default_rng(seed)
    flat = {path: jax.device_put(_leaf(path[-1], leaf.shape, rng))
            for path, leaf in traverse_util.flatten_dict(shapes).items()}
    return traverse_util.unflatten_dict(flat)

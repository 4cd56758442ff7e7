"""FLUX.1-schnell (timestep-distilled, 1-4 steps): FLUX.1-dev's architecture without the
guidance embedder.

Architecture only, as flux_dev.py."""

import ml_collections

from diffusion_jax.configs import flux_dev


def get_config() -> ml_collections.ConfigDict:
    config = flux_dev.get_config()
    # FluxTransformer2DModel, 11,891,178,560 parameters.
    config.transformer.guidance_embeds = False  # no guidance input
    config.tokenizer_2.max_length = 256  # schnell's pipeline default max_sequence_length
    return config

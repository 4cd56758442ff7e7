"""FLUX.1-schnell (timestep-distilled, 1-4 steps): FLUX.1-dev's architecture without the
guidance embedder.

Architecture only; the text towers and the system description come with the Flux pipeline."""

import ml_collections

from diffusion_jax.configs import flux_dev


def get_config() -> ml_collections.ConfigDict:
    config = flux_dev.get_config()
    # FluxTransformer2DModel, 11,891,178,560 parameters.
    config.transformer.guidance_embeds = False  # no guidance input
    return config

"""Stable Diffusion 3.5 Large (stabilityai/stable-diffusion-3.5-large): SD3 widened to 38
heads and deepened to 38 blocks, with RMS query/key norms (3.5 Large Turbo shares it).

The other towers, the VAE and the schedule are SD3 Medium's (`sd3_medium.sd3_system`).
"""

import ml_collections

from diffusion_jax.configs import sd3_medium


def transformer() -> dict:
    """SD3Transformer2DModel, 8,056,627,520 parameters (without the pos_embed buffer)."""
    return dict(
        sd3_medium.transformer(),
        num_layers=38,  # joint transformer blocks
        num_attention_heads=38,  # heads per attention: 2432 wide
        caption_projection_dim=2432,  # = the token width
        qk_norm="rms_norm",  # RMS norm of each head's queries and keys
    )


def get_config() -> ml_collections.ConfigDict:
    return sd3_medium.sd3_system(transformer())

"""Stable Diffusion 3.5 Large (stabilityai/stable-diffusion-3.5-large): SD3 widened to 38
heads and deepened to 38 blocks, with RMS query/key norms (3.5 Large Turbo shares it).

The transformer section only, for now (diffusers' `transformer/config.json` keys): the
pipeline config joins it when the SD3 pipeline lands; until then this file has no get_config.
"""

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

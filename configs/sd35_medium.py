"""Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium): SD3 Medium's width
and depth with the MMDiT-X changes, RMS query/key norms and a second self-attention in the
first 13 blocks, on a larger position grid.

The other towers, the VAE and the schedule are SD3 Medium's (`sd3_medium.sd3_system`).
"""

import ml_collections

from diffusion_jax.configs import sd3_medium


def transformer() -> dict:
    """SD3Transformer2DModel, 2,243,171,520 parameters (without the pos_embed buffer)."""
    return dict(
        sd3_medium.transformer(),
        pos_embed_max_size=384,  # position grid side in patches: latents up to 768 per side
        dual_attention_layers=tuple(range(13)),  # blocks 0..12 add attn2 (SD35AdaLayerNormZeroX)
        qk_norm="rms_norm",  # RMS norm of each head's queries and keys
    )


def get_config() -> ml_collections.ConfigDict:
    return sd3_medium.sd3_system(transformer())

"""Stable Diffusion 2.1-base (512x512, epsilon prediction)."""

import ml_collections

from diffusion_jax.configs import sd21


def get_config() -> ml_collections.ConfigDict:
    config = sd21.get_config()
    config.unet.sample_size = 64  # latent side at the native 512x512 resolution
    config.unet.upcast_attention = False  # only the 768-v model needs fp32 attention
    config.vae.sample_size = 512  # the training image side
    config.schedule.prediction_type = "epsilon"  # the base model predicts the noise
    return config

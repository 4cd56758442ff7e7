"""An SDXL-shaped benchmark system for this CPU (`diffusion-jax bench unet --config
sdxl_bench`): sdxl_base's structure (no attention at the top level, several transformer
blocks per attention layer, text_time micro-conditioning, two text towers) at bench.py's
scale: U-Net blocks (64, 128, 256) on 32x32x4 latents."""

import ml_collections

from diffusion_jax.configs import bench, sdxl_base


def get_config() -> ml_collections.ConfigDict:
    config = sdxl_base.get_config()
    small = bench.get_config()
    config.unet.update(dict(
        sample_size=32,  # latent side: 32x32x4
        block_out_channels=(64, 128, 256),  # channels per level, as bench.py
        attention_head_dim=(1, 2, 4),  # heads per block: 64 channels each, as SDXL
        cross_attention_dim=128 + 256,  # the two towers' penultimate features
        transformer_layers_per_block=(1, 2, 2),  # SDXL: 1, 2, 10
        addition_time_embed_dim=32,  # sinusoid width per size/crop number
        projection_class_embeddings_input_dim=128 + 6 * 32,  # pooled bigG-like + 6 numbers
    ))
    config.vae = small.vae.to_dict()  # bench.py's 3-level VAE (128x128 images)
    config.text_encoder.update(dict(
        hidden_size=128,  # token width
        intermediate_size=512,  # MLP hidden width
        num_hidden_layers=4,  # transformer layers
        num_attention_heads=2,  # 64 channels per head
    ))
    config.text_encoder_2.update(dict(
        hidden_size=256,  # token width
        intermediate_size=1024,  # MLP hidden width
        num_hidden_layers=4,  # transformer layers
        num_attention_heads=4,  # 64 channels per head
        projection_dim=128,  # the pooled embedding the micro-conditioning reads
    ))
    return config

"""A tiny SD 1.x-shaped system with the real structure: random-weight tests and smoke runs."""

import ml_collections

from diffusion_jax.configs import sd15


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.unet.update(dict(
        sample_size=8,  # latent side (16x16 images through the 2x VAE below)
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # both block kinds, as SD
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),  # the mirror, lowest res first
        block_out_channels=(32, 64),  # channels per level, 2x downsampling between
        layers_per_block=1,  # ResNet (+attention) layers per level; the up path has one more
        attention_head_dim=(2, 4),  # heads per block (diffusers' legacy name): 16 channels each
        cross_attention_dim=32,  # = text_encoder.hidden_size
        norm_num_groups=8,  # GroupNorm groups; divides every block_out_channels entry
    ))
    config.vae.update(dict(
        down_block_types=("DownEncoderBlock2D",) * 2,  # 2 levels: 2x downsampling
        up_block_types=("UpDecoderBlock2D",) * 2,  # the decoder's mirror
        block_out_channels=(32, 64),  # encoder channels per level (decoder: reversed)
        layers_per_block=1,  # ResNets per encoder level; the decoder has one more
        norm_num_groups=8,  # GroupNorm groups; divides every block_out_channels entry
        sample_size=16,  # image side: 16x16 images <-> 8x8 latents (= unet.sample_size)
    ))
    config.text_encoder.update(dict(
        hidden_size=32,  # token width (= unet.cross_attention_dim)
        intermediate_size=64,  # MLP hidden width
        num_hidden_layers=3,  # transformer layers
        num_attention_heads=4,  # 8 channels per head
    ))
    return config

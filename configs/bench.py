"""The CPU benchmark system (issue 6): a small SD-shaped model big enough that the math, not
dispatch, dominates. U-Net blocks (64, 128, 256), 2 layers per block, cross-attention 256 on
32x32x4 latents; a 3-level VAE (factor 4, so 128x128 images); a 4-layer 256-wide text tower."""

import ml_collections

from diffusion_jax.configs import sd15


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.unet.update(dict(
        sample_size=32,  # latent side: 32x32x4
        # Text cross-attention at 32x32 and 16x16; ResNets only at 8x8 (as SD's lowest level).
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),  # the mirror
        block_out_channels=(64, 128, 256),  # channels per level, 2x downsampling between
        layers_per_block=2,  # ResNet (+attention) layers per level; the up path has one more
        attention_head_dim=(8, 8, 8),  # heads per block, as diffusers reads SD 1.x configs
        cross_attention_dim=256,  # = text_encoder.hidden_size
        norm_num_groups=32,  # GroupNorm groups; divides every block_out_channels entry
    ))
    config.vae.update(dict(
        down_block_types=("DownEncoderBlock2D",) * 3,  # 3 levels: 4x downsampling
        up_block_types=("UpDecoderBlock2D",) * 3,  # the decoder's mirror
        block_out_channels=(32, 64, 128),  # encoder channels per level (decoder: reversed)
        layers_per_block=1,  # ResNets per encoder level; the decoder has one more
        norm_num_groups=32,  # GroupNorm groups; divides every block_out_channels entry
        sample_size=128,  # 3 levels: a factor of 4, 128x128 images for 32x32 latents
    ))
    config.text_encoder.update(dict(
        hidden_size=256,  # = the U-Net's cross_attention_dim
        intermediate_size=1024,  # MLP hidden width
        num_hidden_layers=4,  # transformer layers
        num_attention_heads=4,  # 64 channels per head, as in SD
    ))
    return config

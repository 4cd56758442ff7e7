"""A tiny SD 1.x-shaped system with the real structure: random-weight tests and smoke runs."""

import ml_collections

from configs import sd15


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.unet.update(dict(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
    ))
    config.vae.update(dict(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    ))
    config.text_encoder.update(dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
    ))
    return config

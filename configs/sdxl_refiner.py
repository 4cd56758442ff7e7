"""SDXL refiner 1.0: the bigG text tower alone, a four-level U-Net conditioned on an
aesthetic score instead of the target size (five micro-conditioning numbers)."""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import sdxl_base


def get_config() -> ml_collections.ConfigDict:
    config = sdxl_base.get_config()
    config.system = system.SDXL_REFINER.to_dict()  # bigG alone
    del config["text_encoder"], config["tokenizer"]
    config.pipeline = dict(force_zeros_for_empty_prompt=False)  # as the release's model_index
    # Conditional U-Net, 2,259,526,660 parameters.
    config.unet.update(dict(
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        block_out_channels=(384, 768, 1536, 1536),  # channels per level
        attention_head_dim=(6, 12, 24, 24),  # heads per block (64 channels each)
        cross_attention_dim=1280,  # bigG's penultimate features only
        transformer_layers_per_block=(4, 4, 4, 4),  # transformer blocks per attention layer
        projection_class_embeddings_input_dim=2560,  # 1280 pooled + 5 x 256
    ))
    return config

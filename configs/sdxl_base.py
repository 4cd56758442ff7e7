"""SDXL base 1.0 (1024x1024): two text towers (CLIP ViT-L and OpenCLIP ViT-bigG with its
projection), a three-level U-Net with micro-conditioning, the SD VAE at a new scale.

Architecture only (like sd15.py): the sections use the diffusers / transformers config.json
key names."""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import sd15, sd21


def get_config() -> ml_collections.ConfigDict:
    sd = sd15.get_config()
    config = ml_collections.ConfigDict()
    config.system = system.SDXL_BASE.to_dict()  # CLIP-L + bigG, penultimate layers, pooled bigG
    # Conditional U-Net, 2,567,463,684 parameters.
    config.unet = dict(
        sd.unet.to_dict(),
        sample_size=128,  # latent side at 1024x1024
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,  # no attention at 128^2
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),  # the mirror
        block_out_channels=(320, 640, 1280),  # channels per level
        attention_head_dim=(5, 10, 20),  # heads per block (64 channels each)
        cross_attention_dim=2048,  # 768 (CLIP-L) + 1280 (bigG) penultimate features
        use_linear_projection=True,  # Linear layers around the transformer blocks
        transformer_layers_per_block=(1, 2, 10),  # transformer blocks per attention layer
        addition_embed_type="text_time",  # + MLP(pooled bigG, sinusoids of 6 size/crop numbers)
        addition_time_embed_dim=256,  # sinusoid width per number
        projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 x 256
    )
    # AutoencoderKL, 83,653,863 parameters: SD's architecture, retrained.
    config.vae = dict(sd.vae.to_dict(), sample_size=1024, scaling_factor=0.13025)
    # CLIP ViT-L/14 (as SD 1.x), 123,060,480 parameters.
    config.text_encoder = sd.text_encoder.to_dict()
    # OpenCLIP ViT-bigG/14 with its text projection, 694,659,840 parameters.
    config.text_encoder_2 = dict(
        sd.text_encoder.to_dict(),
        hidden_size=1280,  # token width
        intermediate_size=5120,  # MLP hidden width
        num_hidden_layers=32,  # transformer layers
        num_attention_heads=20,  # 64 channels per head
        hidden_act="gelu",  # OpenCLIP's exact (erf) GELU
        projection_dim=1280,  # text_projection: pooled EOS embedding -> 1280
    )
    config.schedule = sd.schedule.to_dict()  # SD's scaled-linear epsilon schedule
    config.tokenizer = sd.tokenizer.to_dict()  # CLIP-L's: pads with <|endoftext|>
    # model_index.json's pipeline facts: an empty negative prompt is all-zero conditioning.
    config.pipeline = dict(force_zeros_for_empty_prompt=True)
    config.tokenizer_2 = sd21.get_config().tokenizer.to_dict()  # bigG's: pads with "!"
    return config

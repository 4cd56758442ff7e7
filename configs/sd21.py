"""Stable Diffusion 2.1 (768x768, v-prediction): OpenCLIP ViT-H text tower, linear projections."""

import ml_collections

from diffusion_jax.configs import sd15


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    # Conditional U-Net, 865,910,724 parameters.
    config.unet.sample_size = 96  # latent side at the native 768x768 resolution
    config.unet.attention_head_dim = (5, 10, 20, 20)  # heads per block (64 channels each)
    config.unet.cross_attention_dim = 1024  # OpenCLIP ViT-H/14 hidden size
    config.unet.use_linear_projection = True  # Linear layers around the transformer blocks
    config.unet.upcast_attention = True  # fp16 attention overflows in the 768-v model
    config.vae.sample_size = 768  # the training image side; architecture as SD 1.x
    # OpenCLIP ViT-H/14 text tower without its last block: SD 2 conditions on the
    # penultimate layer, which diffusers stores as a 23-layer model.
    config.text_encoder.hidden_size = 1024  # token width (= unet.cross_attention_dim)
    config.text_encoder.intermediate_size = 4096  # MLP hidden width
    config.text_encoder.num_hidden_layers = 23  # ViT-H/14 has 24; the last is dropped
    config.text_encoder.num_attention_heads = 16  # 64 channels per head
    config.text_encoder.hidden_act = "gelu"  # OpenCLIP's exact (erf) GELU
    config.schedule.prediction_type = "v_prediction"  # the U-Net predicts v = alpha eps - sigma x0
    config.schedule.timestep_spacing = "leading"  # as SD 1.x (and steps_offset=1)
    config.tokenizer.pad_token = "!"  # OpenCLIP pads with token 0
    return config

"""Stable Diffusion 2.1 (768x768, v-prediction): OpenCLIP ViT-H text tower, linear projections."""

import ml_collections

from configs import sd15


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    # Conditional U-Net, 865,910,724 parameters.
    config.unet.sample_size = 96
    config.unet.attention_head_dim = (5, 10, 20, 20)  # heads per block (64 channels each)
    config.unet.cross_attention_dim = 1024
    config.unet.use_linear_projection = True
    config.unet.upcast_attention = True  # fp16 attention overflows in the 768-v model
    config.vae.sample_size = 768
    # OpenCLIP ViT-H/14 text tower without its last block: SD 2 conditions on the
    # penultimate layer, which diffusers stores as a 23-layer model.
    config.text_encoder.hidden_size = 1024
    config.text_encoder.intermediate_size = 4096
    config.text_encoder.num_hidden_layers = 23
    config.text_encoder.num_attention_heads = 16
    config.text_encoder.hidden_act = "gelu"
    config.schedule.prediction_type = "v_prediction"
    config.schedule.timestep_spacing = "leading"
    config.tokenizer.pad_token = "!"  # OpenCLIP pads with token 0
    return config

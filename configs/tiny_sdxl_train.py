"""configs/tiny_train.py with SDXL base's structure, shrunk to seconds: two text towers (a
CLIP-L-like one and a bigG-like one with its projection, both read at their penultimate
layer), the pooled embedding and the size/crop micro-conditioning (text_time) of the U-Net,
no attention at the top level; two U-Net levels, not three, to compile in seconds. Tests and
smoke runs of the SDXL training path."""

import ml_collections

from diffusion_jax.configs import sdxl_base, tiny_train


def get_config() -> ml_collections.ConfigDict:
    config = tiny_train.get_config()
    sdxl = sdxl_base.get_config()
    config.system = sdxl.system.to_dict()  # CLIP-L + bigG, penultimate layers, pooled bigG
    config.unet = dict(
        sdxl.unet.to_dict(),
        sample_size=8,  # latent side (32x32 images, the VAE's 4x downsampling)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # no attention at 8x8
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),  # the mirror
        block_out_channels=(16, 32),  # channels per level
        layers_per_block=1,  # ResNet (+ attention) layers per level; the up path has one more
        attention_head_dim=(1, 2),  # heads per block: 16 channels each
        transformer_layers_per_block=(1, 2),  # SDXL: 1, 2, 10
        norm_num_groups=4,  # GroupNorm groups; divides every block_out_channels entry
        cross_attention_dim=16 + 32,  # the two towers' penultimate features side by side
        addition_time_embed_dim=8,  # sinusoid width per size/crop number
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled (projection_dim) + 6 numbers
    )
    config.text_encoder.update(dict(
        num_hidden_layers=2,  # two, so the penultimate layer is a transformer layer's output
    ))
    config.text_encoder_2 = dict(
        sdxl.text_encoder_2.to_dict(),
        hidden_size=32,  # token width
        intermediate_size=64,  # MLP hidden width
        num_hidden_layers=2,  # transformer layers
        num_attention_heads=2,  # 16 channels per head
        max_position_embeddings=16,  # class captions are <= 8 tokens
        projection_dim=16,  # the pooled embedding the micro-conditioning reads
    )
    config.tokenizer_2 = dict(sdxl.tokenizer_2.to_dict(), max_length=16)  # bigG's: pads with "!"
    config.pipeline = sdxl.pipeline.to_dict()  # an empty negative prompt is zero conditioning
    config.vae_training.steps = 2  # VAE stage: global steps 1..2
    config.training.steps = 4  # U-Net stage: global steps 3..6
    config.checkpoint.every_steps = 2  # per stage, plus each stage's last step
    config.eval_every_steps = 2  # steps between held-out losses (and each stage's end)
    return config

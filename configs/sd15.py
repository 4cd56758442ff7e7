"""Stable Diffusion 1.5: architecture of the released model (diffusers config names).

The model sections use the keys of the diffusers / transformers `config.json` files, so a
converted checkpoint and this file describe a model the same way.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Conditional U-Net, 859,520,964 parameters.
    config.unet = dict(
        sample_size=64,  # latent side at the native 512x512 resolution
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(8, 8, 8, 8),  # heads per block (diffusers' legacy name)
        cross_attention_dim=768,  # CLIP ViT-L/14 hidden size
        use_linear_projection=False,  # 1x1 convs around the transformer blocks
        upcast_attention=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
    )
    # AutoencoderKL, 83,653,863 parameters; 8x spatial downsampling to 4 latent channels.
    config.vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,  # latents are scaled to unit variance for the U-Net
        sample_size=512,
    )
    # CLIP ViT-L/14 text tower (transformers CLIPTextModel), 123,060,480 parameters.
    config.text_encoder = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,  # legacy ids: the pooled output takes the argmax token (EOS)
        eos_token_id=2,
        pad_token_id=1,
    )
    # Noise schedule the model was trained with (diffusers scheduler config names).
    config.schedule = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,  # DDIM/PNDM: the final step ends at abar_0, as SD ships
    )
    # Tokenizer: SD 1.x pads with the end-of-text token.
    config.tokenizer = dict(max_length=77, pad_token="<|endoftext|>")
    return config

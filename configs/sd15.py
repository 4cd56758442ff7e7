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
        in_channels=4,  # = vae.latent_channels (inpainting U-Nets take 9: + mask + masked latents)
        out_channels=4,  # channels of the prediction (what schedule.prediction_type says)
        # Per level, full res first: CrossAttnDownBlock2D (ResNets + cross-attn) | DownBlock2D
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,  # the mirror, lowest first
        block_out_channels=(320, 640, 1280, 1280),  # channels per level, 2x downsampling between
        layers_per_block=2,  # ResNet (+attention) layers per level; the up path has one more
        attention_head_dim=(8, 8, 8, 8),  # heads per block (diffusers' legacy name)
        cross_attention_dim=768,  # CLIP ViT-L/14 hidden size
        use_linear_projection=False,  # 1x1 convs around the transformer blocks
        upcast_attention=False,  # True: attention in float32 whatever the compute dtype
        flip_sin_to_cos=True,  # timestep embedding laid out [cos, sin] (False: [sin, cos])
        freq_shift=0,  # sinusoid frequencies 10000^(-i / (dim/2 - freq_shift)), as diffusers
        norm_num_groups=32,  # GroupNorm groups; divides every block_out_channels entry
        norm_eps=1e-5,  # GroupNorm epsilon (the VAE's is fixed at 1e-6)
    )
    # AutoencoderKL, 83,653,863 parameters; 8x spatial downsampling to 4 latent channels.
    config.vae = dict(
        in_channels=3,  # RGB images in [-1, 1]
        out_channels=3,  # RGB reconstructions
        down_block_types=("DownEncoderBlock2D",) * 4,  # the only type; one per level
        up_block_types=("UpDecoderBlock2D",) * 4,  # the only type; one per level
        block_out_channels=(128, 256, 512, 512),  # encoder channels per level (decoder: reversed)
        layers_per_block=2,  # ResNets per encoder level; the decoder has one more
        latent_channels=4,  # channels of the latents (= unet.in_channels)
        norm_num_groups=32,  # GroupNorm groups; divides every block_out_channels entry
        scaling_factor=0.18215,  # latents are scaled to unit variance for the U-Net
        sample_size=512,  # the training image side; the VAE itself takes any multiple of 8
    )
    # CLIP ViT-L/14 text tower (transformers CLIPTextModel), 123,060,480 parameters.
    config.text_encoder = dict(
        vocab_size=49408,  # token embedding rows: the CLIP BPE vocabulary
        hidden_size=768,  # token width (= unet.cross_attention_dim)
        intermediate_size=3072,  # MLP hidden width
        num_hidden_layers=12,  # transformer layers
        num_attention_heads=12,  # heads per layer; hidden_size must divide by it
        max_position_embeddings=77,  # longest token sequence (>= tokenizer.max_length)
        hidden_act="quick_gelu",  # MLP activation: quick_gelu (OpenAI CLIP) | gelu (OpenCLIP)
        layer_norm_eps=1e-5,  # LayerNorm epsilon
        bos_token_id=0,  # legacy ids: the pooled output takes the argmax token (EOS)
        eos_token_id=2,  # 2 (legacy): pool at the largest id; else at the first eos_token_id
        pad_token_id=1,  # unused here (the tokenizer section pads); kept for config.json
    )
    # Noise schedule the model was trained with (diffusers scheduler config names).
    config.schedule = dict(
        num_train_timesteps=1000,  # T: training timesteps t = 0 .. T-1
        beta_schedule="scaled_linear",  # linear in sqrt(beta); others: linear | squaredcos_cap_v2
        beta_start=0.00085,  # noise rate beta at t = 0
        beta_end=0.012,  # noise rate beta at t = T-1
        prediction_type="epsilon",  # U-Net target: epsilon (noise) | v_prediction | sample (x0)
        timestep_spacing="leading",  # inference timestep grid: leading | trailing | linspace
        steps_offset=1,  # added to "leading" inference timesteps (SD: 981, ..., 1 at 50 steps)
        set_alpha_to_one=False,  # DDIM/PNDM: the final step ends at abar_0, as SD ships
    )
    # Tokenizer: SD 1.x pads with the end-of-text token.
    config.tokenizer = dict(
        max_length=77,  # ids per prompt: BOS, <= 75 BPE tokens, EOS, then padding
        pad_token="<|endoftext|>",  # "<|endoftext|>" (SD 1.x) | "!" (SD 2.x, id 0)
    )
    return config

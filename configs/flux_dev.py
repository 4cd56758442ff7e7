"""FLUX.1-dev (guidance-distilled): the Flux transformer, the 16-channel Flux VAE, CLIP ViT-L
(its pooled output only) and T5-XXL (the context), on a rectified-flow schedule shifted by
image size.

Architecture only (like sdxl_base.py): the sections use the diffusers config.json key names.
`diffusion-jax params` counts it; `convert --from diffusers` of a FluxPipeline folder writes a
checkpoint of this system."""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import sd15, t5


def get_config() -> ml_collections.ConfigDict:
    sd = sd15.get_config()
    config = ml_collections.ConfigDict()
    config.system = system.FLUX.to_dict()  # pooled CLIP-L, T5-XXL context, the Flux transformer
    # FluxTransformer2DModel, 11,901,408,320 parameters.
    config.transformer = dict(
        patch_size=1,  # tokens are 2x2 latent patches packed outside the model
        in_channels=64,  # packed token width: 16 latent channels x 2 x 2
        num_layers=19,  # double-stream blocks (separate text and image weights)
        num_single_layers=38,  # single-stream blocks on the joint sequence
        attention_head_dim=128,  # width per head
        num_attention_heads=24,  # heads: 3072 wide
        joint_attention_dim=4096,  # T5-XXL context width
        pooled_projection_dim=768,  # CLIP ViT-L pooled width
        guidance_embeds=True,  # dev: embeds the distilled guidance scale beside the timestep
        axes_dims_rope=(16, 56, 56),  # RoPE widths per position axis (text, row, column)
    )
    # AutoencoderKL, 83,819,683 parameters: SD's architecture with 16 latent channels and no
    # quant convs.
    config.vae = dict(
        sd.vae.to_dict(),
        latent_channels=16,  # latent channels
        use_quant_conv=False,  # no 1x1 conv after the encoder
        use_post_quant_conv=False,  # no 1x1 conv before the decoder
        scaling_factor=0.3611,  # latents = (z - shift_factor) * scaling_factor
        shift_factor=0.1159,
        sample_size=1024,  # training resolution
    )
    # CLIP ViT-L/14 (as SD 1.x), 123,060,480 parameters: its pooled EOS embedding.
    config.text_encoder = sd.text_encoder.to_dict()
    # T5 v1.1 XXL encoder, 4,762,310,656 parameters: the text tokens.
    config.text_encoder_2 = t5.t5_xxl()
    # FlowMatchEulerDiscreteScheduler as FLUX.1 ships it: the shift follows the image's
    # token count (mu from base_shift at 256 tokens to max_shift at 4096).
    config.schedule = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                           max_image_seq_len=4096)
    config.tokenizer = sd.tokenizer.to_dict()  # CLIP-L's, 77 ids
    config.tokenizer_2 = dict(max_length=512)  # T5's (read from the checkpoint's tokenizer_2/)
    return config

"""FLUX.1-dev (guidance-distilled): the Flux transformer and the 16-channel Flux VAE.

Architecture only (like sdxl_base.py): the sections use the diffusers config.json key names.
The text towers (CLIP ViT-L for the pooled embedding, T5-XXL `configs/t5.py` for the context)
and the system description come with the Flux pipeline, which is still to come."""

import ml_collections

from diffusion_jax.configs import sd15


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
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
        sd15.get_config().vae.to_dict(),
        latent_channels=16,  # latent channels
        use_quant_conv=False,  # no 1x1 conv after the encoder
        use_post_quant_conv=False,  # no 1x1 conv before the decoder
        scaling_factor=0.3611,  # latents = (z - shift_factor) * scaling_factor
        shift_factor=0.1159,
        sample_size=1024,  # training resolution
    )
    return config

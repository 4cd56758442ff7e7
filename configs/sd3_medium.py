"""Stable Diffusion 3 Medium (stabilityai/stable-diffusion-3-medium-diffusers): the MMDiT
transformer on the 16-channel SD3 VAE, with CLIP-L, CLIP-G (both with projections) and
T5-XXL as text towers, on a rectified-flow schedule shifted by 3.

Architecture only (like sdxl_base.py): the sections use the diffusers / transformers
config.json key names. `transformer()` is the section SD3.5's files build on, and
`sd3_system(transformer)` the whole system around any of them.
"""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import sd15, sdxl_base, t5


def transformer() -> dict:
    """SD3Transformer2DModel, 2,028,328,000 parameters (without the pos_embed buffer)."""
    return dict(
        sample_size=128,  # latent side at 1024x1024 (sets the position grid's scale)
        patch_size=2,  # 2x2 latent patches per token
        in_channels=16,  # the SD3 VAE's latent channels
        out_channels=16,  # the velocity, in latent channels
        num_layers=24,  # joint transformer blocks (the last one context_pre_only)
        num_attention_heads=24,  # heads per attention
        attention_head_dim=64,  # width per head: 1536 wide
        joint_attention_dim=4096,  # text context width (CLIP-L + CLIP-G padded, and T5-XXL)
        caption_projection_dim=1536,  # context_embedder's output: the token width
        pooled_projection_dim=2048,  # pooled CLIP-L (768) + CLIP-G (1280)
        pos_embed_max_size=192,  # position grid side in patches: latents up to 384 per side
        dual_attention_layers=(),  # no second self-attention
        qk_norm=None,  # no query/key norm
    )


def get_config() -> ml_collections.ConfigDict:
    return sd3_system(transformer())


def sd3_system(transformer_section: dict) -> ml_collections.ConfigDict:
    """The SD3 system around an SD3Transformer2DModel section (SD3 Medium's, SD3.5's)."""
    sd, sdxl = sd15.get_config(), sdxl_base.get_config()
    config = ml_collections.ConfigDict()
    config.system = system.SD3.to_dict()  # CLIP-L + CLIP-G tokens, then T5's; pooled CLIPs
    config.transformer = transformer_section
    # AutoencoderKL, 83,819,683 parameters: SD's architecture with 16 latent channels and no
    # quant convs (as Flux's), at its own scale and shift.
    config.vae = dict(
        sd.vae.to_dict(),
        latent_channels=16,  # latent channels
        use_quant_conv=False,  # no 1x1 conv after the encoder
        use_post_quant_conv=False,  # no 1x1 conv before the decoder
        scaling_factor=1.5305,  # latents = (z - shift_factor) * scaling_factor
        shift_factor=0.0609,
        sample_size=1024,  # training resolution
    )
    # CLIP ViT-L/14 with its text projection (768 -> 768), 123,650,304 parameters.
    config.text_encoder = dict(sd.text_encoder.to_dict(), projection_dim=768)
    # OpenCLIP ViT-bigG/14 with its text projection (as SDXL's), 694,659,840 parameters.
    config.text_encoder_2 = sdxl.text_encoder_2.to_dict()
    # T5 v1.1 XXL encoder, 4,762,310,656 parameters.
    config.text_encoder_3 = t5.t5_xxl()
    # FlowMatchEulerDiscreteScheduler as SD3 ships it: a fixed shift of 3.
    config.schedule = dict(num_train_timesteps=1000, shift=3.0)
    config.tokenizer = sd.tokenizer.to_dict()  # CLIP-L's: pads with <|endoftext|>
    config.tokenizer_2 = sdxl.tokenizer_2.to_dict()  # CLIP-G's: pads with "!"
    # T5's: the vocabulary comes from a converted checkpoint's tokenizer_3/; 256 tokens, the
    # pipeline's max_sequence_length default.
    config.tokenizer_3 = dict(max_length=256)
    return config

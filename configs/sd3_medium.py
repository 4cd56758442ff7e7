"""Stable Diffusion 3 Medium (stabilityai/stable-diffusion-3-medium-diffusers).

The transformer section only, for now (diffusers' `transformer/config.json` keys): the SD3
pipeline config (three text towers, the 16-channel VAE, the flow schedule) joins it when the
pipeline lands; until then this file has no get_config.
"""


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

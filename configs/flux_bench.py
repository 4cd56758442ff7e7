"""A Flux.1-dev-shaped benchmark system for this CPU (`diffusion-jax bench transformer
--config flux_bench`): flux_dev's transformer structure (double-stream blocks, then
single-stream ones, RoPE over (text, row, column), guidance embeddings) at a CPU's scale:
256 wide (4 heads of 64), 2 + 4 blocks, on 32x32x16 latents (256 packed image tokens) with a
77-token context; the text towers and VAE shrunk as bench.py's."""

import ml_collections

from diffusion_jax.configs import bench, flux_dev


def get_config() -> ml_collections.ConfigDict:
    config = flux_dev.get_config()
    small = bench.get_config()
    config.transformer.update(dict(
        num_layers=2,  # double-stream blocks (dev: 19)
        num_single_layers=4,  # single-stream blocks (dev: 38)
        attention_head_dim=64,  # width per head (dev: 128)
        num_attention_heads=4,  # heads: 256 wide (dev: 24, 3072 wide)
        joint_attention_dim=256,  # the T5-like context width (dev: 4096)
        pooled_projection_dim=128,  # the CLIP-like pooled width (dev: 768)
        axes_dims_rope=(8, 28, 28),  # RoPE widths per axis, summing to the head width
    ))
    config.vae = dict(small.vae.to_dict(), latent_channels=16, use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    config.text_encoder = small.text_encoder.to_dict()  # pooled width = its hidden size
    config.text_encoder.update(hidden_size=128, intermediate_size=512)
    config.text_encoder_2.update(dict(d_model=256, d_kv=64, d_ff=512, num_layers=2,
                                      num_heads=4))
    return config

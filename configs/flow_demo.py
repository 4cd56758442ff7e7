"""A research demo: the embedded demo's task with a rectified-flow MMDiT in place of the
DDPM U-Net (issue 17), on the same bundled Fashion-MNIST, VAE stage and text tower.

Stage 1 trains the same small VAE (32x32x3 -> 8x8x4); stage 2 a small SD3-style joint
transformer (diffusers' SD3Transformer2DModel structure: 2x2 patches of the 8x8 latents ->
16 image tokens beside the caption's tokens) with the rectified-flow objective of SD3
(x_t = (1 - t) x0 + t eps, velocity target eps - x0, logit-normal times), sampled with
flow_euler. Compare with the U-Net demo (configs/default.py) at equal wall time and samples.
"""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import default

# The demo's text tower gives the token context and its pooled EOS output (SD3 takes both
# from its CLIP towers); the transformer replaces the U-Net.
FLOW_DEMO = system.System(
    denoiser=system.Tower("transformer", "mmdit"), vae=system.Tower("vae", "vae"),
    text_towers=(system.TextTower("text_encoder", "clip_text", pooled="pooler_output"),))


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    del config["unet"]
    config.system = FLOW_DEMO.to_dict()
    config.transformer = dict(
        sample_size=8,  # latent side (= the VAE's 32 / 4)
        patch_size=2,  # 2x2 latent patches: 16 image tokens
        in_channels=4,  # the demo VAE's latent channels
        out_channels=4,  # the velocity, in latent channels
        num_layers=4,  # joint blocks (the last one context_pre_only)
        num_attention_heads=4,  # heads per attention
        attention_head_dim=16,  # width per head: 64 wide
        joint_attention_dim=64,  # = text_encoder.hidden_size
        caption_projection_dim=64,  # = heads x head dim (text and image tokens share it)
        pooled_projection_dim=64,  # = text_encoder.hidden_size (its pooled EOS output)
        pos_embed_max_size=4,  # position grid side in patches (8 / 2)
    )
    # SD3's rectified flow: shift 1 at this size (SD3 uses 3.0 at 1024x1024).
    config.schedule = dict(num_train_timesteps=1000, shift=1.0, time_sampling="logit_normal",
                           logit_mean=0.0, logit_std=1.0,
                           loss_weighting="none")  # | sigma_sqrt | cosmap (SD3 paper's)
    config.training.update(dict(
        trainable=(r"transformer/.*",),  # the denoiser (the default's rules name the U-Net)
        min_snr_gamma=0.0,  # SNR weighting is DDPM's; the flow loss is unweighted
        learning_rate=1e-3,
    ))
    config.sample.update(dict(sampler="flow_euler", steps=20))
    return config

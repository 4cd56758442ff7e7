"""configs/default.py shrunk to seconds: tests and smoke runs of the whole training path."""

import ml_collections

from diffusion_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.vae.update(dict(
        block_out_channels=(8, 8, 8),  # encoder channels per level (3 levels, as default)
        norm_num_groups=4,  # GroupNorm groups; divides every block_out_channels entry
    ))
    config.unet.update(dict(
        block_out_channels=(16, 16),  # channels per level
        attention_head_dim=(2, 2),  # heads per block: 8 channels each
        cross_attention_dim=16,  # = text_encoder.hidden_size
        norm_num_groups=4,  # GroupNorm groups; divides every block_out_channels entry
    ))
    config.text_encoder.update(dict(
        hidden_size=16,  # token width (= unet.cross_attention_dim)
        intermediate_size=32,  # MLP hidden width
        num_hidden_layers=1,  # transformer layers
        num_attention_heads=2,  # 8 channels per head
    ))
    config.data.batch_size = 8  # global batch of the U-Net stage
    config.vae_training.batch_size = 8  # global batch of the VAE stage
    config.vae_training.steps = 6  # VAE stage: global steps 1..6
    config.vae_training.warmup_steps = 2  # linear learning-rate warm-up
    config.training.steps = 8  # U-Net stage: global steps 7..14
    config.training.warmup_steps = 2  # linear learning-rate warm-up
    config.checkpoint.every_steps = 4  # per stage, plus each stage's last step
    config.log_every_steps = 2  # steps between train logs and NaN checks
    config.eval_every_steps = 4  # steps between held-out losses (and each stage's end)
    config.eval_examples = 16  # held-out examples for the eval loss
    config.sample_every_steps = 0  # no grids during training, one at the end
    config.sample.prompts = config.sample.prompts[:2]  # t-shirt and trouser
    config.sample.seeds_per_prompt = 2  # a 2x2 final grid
    config.sample.steps = 2  # denoising steps
    config.final_eval.samples_per_class = 0  # 0: no class-accuracy evaluation
    config.final_eval.fid_samples = 0  # 0: no FID (slow; needs the Inception weights)
    return config

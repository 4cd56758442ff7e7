"""configs/tiny_train.py with the flow demo's structure (configs/flow_demo.py), shrunk to
seconds: a rectified-flow MMDiT (SD3's joint transformer) on the tiny VAE's latents, reading
the tiny text tower's tokens and pooled output. Tests and smoke runs of the flow training
path."""

import ml_collections

from diffusion_jax.configs import flow_demo, tiny_train


def get_config() -> ml_collections.ConfigDict:
    config = tiny_train.get_config()
    flow = flow_demo.get_config()
    del config["unet"]
    config.system = flow.system.to_dict()  # the MMDiT in the U-Net's place
    config.schedule = flow.schedule.to_dict()  # rectified flow, logit-normal training times
    config.transformer = dict(
        flow.transformer.to_dict(),
        num_layers=2,  # joint blocks (the last one context_pre_only)
        num_attention_heads=2,  # heads per attention
        attention_head_dim=8,  # width per head: 16 wide
        joint_attention_dim=16,  # = text_encoder.hidden_size
        caption_projection_dim=16,  # = heads x head dim
        pooled_projection_dim=16,  # = text_encoder.hidden_size
    )
    config.training.update(dict(trainable=flow.training.trainable, min_snr_gamma=0.0))
    config.sample.sampler = flow.sample.sampler  # flow_euler
    config.vae_training.steps = 2  # VAE stage: global steps 1..2
    config.training.steps = 4  # transformer stage: global steps 3..6
    config.checkpoint.every_steps = 2  # per stage, plus each stage's last step
    config.eval_every_steps = 2  # steps between held-out losses (and each stage's end)
    return config

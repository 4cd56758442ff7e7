"""LoRA fine-tune of Stable Diffusion 1.5: rank-16 factors of the U-Net's attention
projections, the converted base frozen; data from precomputed latents (or an image folder).

    diffusion-jax convert --from diffusers path/to/stable-diffusion-v1-5 --out ckpt/sd15
    diffusion-jax train --config lora_sd15 --workdir runs/lora-sd15 \\
        --config.init_from=ckpt/sd15 --config.data.source=folder --config.data.path=images/
    diffusion-jax export --checkpoint runs/lora-sd15 --to peft --out lora.safetensors

`--config.lora.targets` adds layers by regex (lora_train.FEED_FORWARD, TEXT_ATTENTION).
"""

import ml_collections

from diffusion_jax.adapters import lora_train
from diffusion_jax.configs import sd15, sd15_finetune
from diffusion_jax.configs.tiny_lora_train import lora_sections


def get_config() -> ml_collections.ConfigDict:
    config = sd15_finetune.finetune_sections(sd15.get_config(), image_size=512)
    lora_sections(config, rank=16, alpha=16.0, targets=(lora_train.ATTENTION,))
    config.training.update(dict(
        steps=5_000,  # optimizer steps
        learning_rate=1e-4,  # diffusers' train_text_to_image_lora default
        warmup_steps=0,  # constant from the first step, as diffusers' LoRA script
    ))
    config.data.batch_size = 16  # global
    config.checkpoint.every_steps = 500  # steps between checkpoints
    config.frozen_dtype = "bfloat16"  # the frozen base on the devices (saved once, float32)
    config.sample_every_steps = 1000  # sample grids during training (and at the end)
    return config

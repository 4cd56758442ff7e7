"""LoRA fine-tune of SDXL base 1.0: rank-16 factors of the U-Net's attention projections,
the converted base (both text towers, U-Net, VAE) frozen.

    diffusion-jax convert --from diffusers path/to/stable-diffusion-xl-base-1.0 --out ckpt/sdxl
    diffusion-jax train --config lora_sdxl --workdir runs/lora-sdxl \\
        --config.init_from=ckpt/sdxl --config.data.source=folder --config.data.path=images/
    diffusion-jax export --checkpoint runs/lora-sdxl --to kohya --out lora.safetensors
"""

import ml_collections

from diffusion_jax.adapters import lora_train
from diffusion_jax.configs import sdxl_finetune
from diffusion_jax.configs.tiny_lora_train import lora_sections


def get_config() -> ml_collections.ConfigDict:
    config = sdxl_finetune.get_config()
    lora_sections(config, rank=16, alpha=16.0, targets=(lora_train.ATTENTION,))
    config.training.update(dict(
        steps=5_000,  # optimizer steps
        learning_rate=1e-4,  # diffusers' train_text_to_image_lora_sdxl default
        warmup_steps=0,  # constant from the first step
    ))
    config.checkpoint.every_steps = 500  # steps between checkpoints
    config.frozen_dtype = "bfloat16"  # the frozen base on the devices (saved once, float32)
    return config

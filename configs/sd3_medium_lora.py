"""LoRA fine-tune of Stable Diffusion 3 Medium at 1024x1024 (diffusers'
train_dreambooth_lora_sd3 recipe): rank-16 factors of the MMDiT's attention projections, the
converted base frozen in bfloat16, bf16 compute, remat per block; data from latents
precomputed with the three text towers.

    diffusion-jax convert --from diffusers path/to/stable-diffusion-3-medium-diffusers --out ckpt/sd3
    diffusion-jax train --config sd3_medium_lora --workdir runs/sd3-lora \\
        --config.init_from=ckpt/sd3 --config.data.path=/data/latents/sd3-1024
    diffusion-jax export --checkpoint runs/sd3-lora --to peft --out lora.safetensors
"""

import ml_collections

from diffusion_jax.configs import sd3_medium_finetune
from diffusion_jax.configs.flux_dev_lora import transformer_lora_sections


def get_config() -> ml_collections.ConfigDict:
    return transformer_lora_sections(sd3_medium_finetune.get_config())

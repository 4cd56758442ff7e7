"""Fine-tune Stable Diffusion 2.1 (768x768, v-prediction) from a converted checkpoint: the
sd15_finetune recipe on the SD 2.1 architecture and schedule (the loss regresses v).

    diffusion-jax convert --from diffusers path/to/stable-diffusion-2-1 --out gs://b/ckpt/sd21
    diffusion-jax train --config sd21_finetune --workdir gs://b/runs/sd21-ft \\
        --config.init_from=gs://b/ckpt/sd21 --config.data.path=/gcs/b/latents/sd21-768
"""

import ml_collections

from diffusion_jax.configs import sd15_finetune, sd21


def get_config() -> ml_collections.ConfigDict:
    config = sd15_finetune.finetune_sections(sd21.get_config(), image_size=768)
    config.data.batch_size = 32  # global: 2.25x the pixels of 512 per example
    return config

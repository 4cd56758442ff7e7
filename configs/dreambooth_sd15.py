"""DreamBooth LoRA of Stable Diffusion 1.5 with prior preservation, after diffusers'
train_dreambooth_lora: rank-4 factors of the U-Net's attention, 5 or so instance images,
200 class images drawn by the base itself.

    diffusion-jax convert --from diffusers path/to/stable-diffusion-v1-5 --out ckpt/sd15
    diffusion-jax train --config dreambooth_sd15 --workdir runs/db-dog \\
        --config.init_from=ckpt/sd15 --config.data.path=dog/ \\
        --config.dreambooth.instance_prompt="a photo of sks dog" \\
        --config.dreambooth.class_prompt="a photo of dog"
    diffusion-jax export --checkpoint runs/db-dog --to peft --out sks-dog.safetensors

A full DreamBooth fine-tune is the same config without the lora section.
"""

import ml_collections

from diffusion_jax.adapters import lora_train
from diffusion_jax.configs import lora_sd15
from diffusion_jax.configs.tiny_dreambooth_train import dreambooth_sections


def get_config() -> ml_collections.ConfigDict:
    config = lora_sd15.get_config()
    config.lora.update(dict(rank=4, alpha=4.0, targets=(lora_train.ATTENTION,)))
    dreambooth_sections(config, instance_prompt="a photo of sks dog",
                        class_prompt="a photo of dog", num_class_images=200)
    config.dreambooth.update(dict(sampler="ddim", steps=50, guidance=7.5, sample_batch=8))
    config.training.update(dict(steps=500, learning_rate=1e-4, warmup_steps=0))
    config.data.batch_size = 4  # instance rows (4 class rows follow)
    config.data.random_flip = False  # a subject is not always symmetric
    config.data.eval_fraction = 0.05  # of the class images: the eval loss is prior drift
    config.eval_examples = 8
    config.eval_every_steps = 100
    config.checkpoint.every_steps = 100
    config.sample_every_steps = 100
    return config

"""DreamBooth with prior preservation on configs/tiny_lora_train.py's model, in seconds:
tests and smoke runs.

    diffusion-jax train --config tiny_dreambooth_train --workdir runs/db \\
        --config.init_from=ckpt/tiny --config.data.path=instance_images/

The base from init_from draws 11 class images into runs/db/class_images first; each step
then trains the LoRA factors on 4 instance rows and 4 class rows.
"""

import ml_collections

from diffusion_jax.adapters import dreambooth
from diffusion_jax.configs import tiny_lora_train


def dreambooth_sections(config: ml_collections.ConfigDict, *, instance_prompt: str,
                        class_prompt: str, num_class_images: int) -> ml_collections.ConfigDict:
    """The DreamBooth recipe on a training config: instance images from a folder, no caption
    dropout, class images from the base, grids of the instance and the class prompt."""
    config.dreambooth = dreambooth.default_config()
    config.dreambooth.update(dict(instance_prompt=instance_prompt, class_prompt=class_prompt,
                                  num_class_images=num_class_images))
    config.data.source = "folder"  # data.path: the instance images
    config.data.caption_dropout = 0.0  # every row keeps its prompt, as diffusers' script
    config.sample.prompts = (instance_prompt, class_prompt)
    return config


def get_config() -> ml_collections.ConfigDict:
    config = tiny_lora_train.get_config()
    dreambooth_sections(config, instance_prompt="a photo of sks sneaker",
                        class_prompt="a photo of a sneaker", num_class_images=11)
    config.dreambooth.update(dict(steps=2, sample_batch=4))
    config.data.batch_size = 4  # instance rows; as many class rows follow
    config.data.eval_fraction = 0.5  # of the class images: 4 held out (1, 3, 9, 10)
    config.eval_examples = 4
    return config

"""configs/controlnet_demo.py on configs/tiny_train.py's model: seconds, for tests."""

import ml_collections

from diffusion_jax.configs import tiny_train
from diffusion_jax.configs.controlnet_demo import add_controlnet


def get_config() -> ml_collections.ConfigDict:
    config = add_controlnet(tiny_train.get_config(), hint_channels=(4, 8, 8))
    config.training.steps = 4  # ControlNet steps 1..4
    config.training.learning_rate = 1e-3  # large enough to move the zero convs in 4 steps
    config.checkpoint.every_steps = 2  # steps 2 and 4
    config.eval_every_steps = 2  # held-out losses at steps 2 and 4
    config.sample.prompts = config.sample.prompts[:1]  # a 1x2 final grid
    config.sample.seeds_per_prompt = 2
    return config

"""LoRA training on configs/tiny_train.py's model, shrunk to seconds: tests and smoke runs.

    diffusion-jax train --config tiny_lora_train --workdir runs/lora \\
        --config.init_from=ckpt/tiny     # a checkpoint of the tiny architecture
    diffusion-jax export --checkpoint runs/lora --to peft --out lora.safetensors

Only the LoRA factors of the U-Net's attention and the text tower's attention train; the
base towers from init_from stay as they are.
"""

import ml_collections

from diffusion_jax.adapters import lora_train
from diffusion_jax.configs import tiny_train


def lora_sections(config: ml_collections.ConfigDict, *, rank: int, alpha: float,
                  targets: tuple[str, ...]) -> ml_collections.ConfigDict:
    """The LoRA recipe on a training config: every tower from init_from, frozen; the VAE
    stage skipped; only the factors trained, without EMA (lora_sd15.py uses it too)."""
    config.lora = lora_train.default_config()
    config.lora.update(dict(rank=rank, alpha=alpha, targets=targets))
    config.init_towers = ()  # every tower from init_from (required)
    config.vae_training.steps = 0  # the VAE comes from init_from
    config.training.trainable = (r"lora/.*",)  # the factors alone are in the optimizer
    config.training.train_text_encoder = False  # text-tower LoRAs come from lora.targets
    config.training.ema_decay = 0.0  # no EMA copy of the factors
    config.training.weight_decay = 0.0  # decay would pull the factors, not the weights, to 0
    return config


def get_config() -> ml_collections.ConfigDict:
    config = tiny_train.get_config()
    lora_sections(config, rank=2, alpha=4.0,
                  targets=(lora_train.ATTENTION, lora_train.TEXT_ATTENTION))
    config.training.steps = 6  # global steps 1..6
    config.training.learning_rate = 1e-2  # large: a few steps move the factors visibly
    config.checkpoint.every_steps = 2  # steps 2, 4, 6: resume points
    config.eval_every_steps = 6  # one held-out loss, at the end
    return config

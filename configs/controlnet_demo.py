"""A ControlNet on the CPU demo model (configs/default.py), steered by Canny edges of
Fashion-MNIST images (600 steps of batch 64, sized for a CPU; not timed yet).

    diffusion-jax train --workdir runs/demo                 # the demo model, first
    diffusion-jax train --config controlnet_demo --workdir runs/cn_demo \\
        --config.init_from=runs/demo/checkpoints
    diffusion-jax sample --checkpoint runs/demo/checkpoints --controlnet runs/cn_demo/controlnet \\
        --control-image edges.png --prompt "a photo of a sneaker" --out sneaker.png

The ControlNet starts from the demo U-Net (`ControlNetModel.from_unet`: its encoder half
copied, the zero convs at zero) and is the only model the optimizer updates; the U-Net, VAE
and text tower come from init_from and stay frozen. The run writes WORKDIR/controlnet, a
ControlNet checkpoint as `convert` writes one, beside its training checkpoints.
"""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import default
from diffusion_jax.configs.controlnet_sd15 import controlnet_of


def add_controlnet(config: ml_collections.ConfigDict,
                   hint_channels: tuple[int, ...]) -> ml_collections.ConfigDict:
    """A training config of the base model -> one training a ControlNet on it from Canny
    edges, the base frozen. `hint_channels`: the conditioning net's, one stride-2 stage
    between each two (as many as take the images to the latents' size)."""
    config.system = system.with_adapters(system.STABLE_DIFFUSION,
                                         system.CONTROLNET.adapters).to_dict()
    config.controlnet = controlnet_of(config.unet.to_dict(),
                                      conditioning_embedding_out_channels=hint_channels)
    config.init_from = ""  # the base model's checkpoint: --config.init_from=runs/demo/checkpoints
    config.init_towers = ("unet", "vae", "text_encoder")  # the ControlNet starts from the U-Net
    config.data.condition = "canny"  # OpenCV's Canny of each training image
    config.vae_training.steps = 0  # the VAE comes from init_from
    config.training.trainable = (r"controlnet/.*",)  # the ControlNet alone: the base stays frozen
    config.training.ema_decay = 0.0  # no EMA copy: a short run would be mostly its warm-up
    config.final_eval.update(dict(samples_per_class=0, fid_samples=0))  # no condition images
    return config


def get_config() -> ml_collections.ConfigDict:
    # The demo VAE downsamples 4x (SD's 8x): two stride-2 stages take the 32x32 edges to
    # the 8x8 latents.
    config = add_controlnet(default.get_config(), hint_channels=(16, 32, 64))
    config.data.canny_low = 100  # hysteresis thresholds (diffusers' ControlNet example)
    config.data.canny_high = 200
    config.training.update(dict(
        steps=600,  # ControlNet optimizer steps
        learning_rate=5e-4,  # peak AdamW learning rate (reached after warmup_steps)
        warmup_steps=50,  # linear warm-up from 0
    ))
    config.checkpoint.every_steps = 200  # steps between checkpoints (and the last step)
    config.eval_every_steps = 200  # steps between held-out losses (and the last step)
    config.sample_every_steps = 0  # one grid at the end: row i under held-out example i's edges
    config.sample.seeds_per_prompt = 4  # the grid's columns
    return config

"""DreamBooth on the CPU demo model (configs/default.py): one bag of the Fashion-MNIST test
set (the bundled diffusion_jax/assets/dreambooth_bag: it and three one-pixel shifts) taught
as "a photo of sks bag", with prior preservation of "a photo of a bag", as rank-8 LoRA
factors of the U-Net's and the text tower's attention. A few minutes on a CPU.

    diffusion-jax train --workdir runs/demo                 # the demo model, first
    diffusion-jax train --config dreambooth_demo --workdir runs/db_demo \\
        --config.init_from=runs/demo/checkpoints
    diffusion-jax sample --checkpoint runs/db_demo/checkpoints --prompt "a photo of sks bag" \\
        --num-images 8 --out sks_bag.png
"""

from pathlib import Path

import ml_collections

import diffusion_jax
from diffusion_jax.adapters import lora_train
from diffusion_jax.configs import default
from diffusion_jax.configs.tiny_dreambooth_train import dreambooth_sections
from diffusion_jax.configs.tiny_lora_train import lora_sections

SUBJECT = Path(diffusion_jax.__file__).parent / "assets" / "dreambooth_bag"


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    lora_sections(config, rank=8, alpha=8.0,
                  targets=(lora_train.ATTENTION, lora_train.TEXT_ATTENTION))
    dreambooth_sections(config, instance_prompt="a photo of sks bag",
                        class_prompt="a photo of a bag", num_class_images=64)
    config.init_from = ""  # the demo model: --config.init_from=runs/demo/checkpoints
    config.data.path = str(SUBJECT)
    # The class images as the demo's grids draw: dpmpp_2m, 20 steps, guidance 3.
    config.dreambooth.update(dict(sampler=config.sample.sampler, steps=config.sample.steps,
                                  guidance=config.sample.guidance, sample_batch=16))
    config.data.batch_size = 8  # instance rows (8 class rows follow)
    config.data.eval_fraction = 0.25  # of the class images: the eval loss is prior drift
    config.training.update(dict(steps=300, learning_rate=1e-3, warmup_steps=0,
                                lr_schedule="constant", min_snr_gamma=0.0))
    config.eval_examples = 8
    config.eval_every_steps = 100
    config.checkpoint.every_steps = 100
    config.sample_every_steps = 100
    config.sample.seeds_per_prompt = 8
    config.final_eval.update(dict(samples_per_class=0, fid_samples=0))  # no class labels here
    return config

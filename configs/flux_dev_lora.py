"""LoRA fine-tune of FLUX.1-dev at 1024x1024 (diffusers' train_dreambooth_lora_flux recipe):
rank-16 factors of the transformer's attention projections (both streams), the converted base
frozen in bfloat16 (24 GB of transformer, 9.5 GB of T5-XXL), bf16 compute, remat per block,
every param sharded over every chip; data from latents precomputed with both text towers.

    diffusion-jax convert --from diffusers path/to/FLUX.1-dev --out ckpt/flux-dev
    diffusion-jax train --config flux_dev_lora --workdir runs/flux-lora \\
        --config.init_from=ckpt/flux-dev --config.data.path=/data/latents/flux-1024
    diffusion-jax export --checkpoint runs/flux-lora --to peft --out lora.safetensors

The export loads in diffusers' `FluxPipeline.load_lora_weights`. The frozen base is saved
once, in WORKDIR/frozen, not in every checkpoint.
"""

import ml_collections

from diffusion_jax.adapters import lora_train
from diffusion_jax.configs import flux_dev_finetune
from diffusion_jax.configs.tiny_lora_train import lora_sections


def transformer_lora_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The LoRA recipe on a flow transformer's fine-tune (sd3_medium_lora uses it too)."""
    lora_sections(config, rank=16, alpha=16.0, targets=(lora_train.TRANSFORMER_ATTENTION,))
    config.training.update(dict(
        steps=2_000,  # optimizer steps
        learning_rate=1e-4,  # diffusers' train_dreambooth_lora_flux / _sd3 default
        warmup_steps=0,  # constant from the first step
    ))
    config.data.batch_size = 16  # global
    config.checkpoint.every_steps = 250  # steps between checkpoints
    config.sample_every_steps = 500  # sample grids during training (and at the end)
    return config


def get_config() -> ml_collections.ConfigDict:
    return transformer_lora_sections(flux_dev_finetune.get_config())

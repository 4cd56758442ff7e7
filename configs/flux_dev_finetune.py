"""Full fine-tune of FLUX.1-dev at 1024x1024 from a converted checkpoint: the whole transformer
(11.9 B params) in AdamW, CLIP-L, T5-XXL and the VAE frozen in bfloat16, bf16 compute, remat
per block, every param sharded over every chip; rectified flow with logit-normal times and
Flux's resolution-dependent shift, the distilled guidance input at 3.5 (diffusers'
train_dreambooth_flux); aspect-ratio buckets near 1024x1024 (multiples of 64); data from
latents precomputed with both text towers (T5's 512-token context, CLIP's pooled output).

    diffusion-jax convert --from diffusers path/to/FLUX.1-dev --out ckpt/flux-dev
    diffusion-jax precompute --config flux_dev_finetune --config.init_from=ckpt/flux-dev \\
        --from webdataset 'gs://b/laion/{00000..01023}.tar' --out /data/latents/flux-1024
    diffusion-jax train --config flux_dev_finetune --workdir gs://b/runs/flux-ft \\
        --config.init_from=gs://b/ckpt/flux-dev --config.data.path=/gcs/b/latents/flux-1024

The train state is 143 GB (float32 params and both AdamW moments; no EMA copy, which would
add 48 GB): 4.5 GB per chip on 32. `--dry-run --devices N` (or `diffusion-jax bench memory
--config flux_dev_finetune --devices N`) reports the step's per-chip memory first.
"""

import ml_collections

from diffusion_jax.configs import flux_dev, sd15_finetune


def flow_finetune_sections(config: ml_collections.ConfigDict, *, image_size: int
                           ) -> ml_collections.ConfigDict:
    """The recipe of a rectified-flow transformer's fine-tune (Flux, SD3: sd3_medium_finetune
    uses it too): every tower from init_from, the transformer alone trained, the frozen
    towers in bfloat16, latents in aspect buckets."""
    sd15_finetune.finetune_sections(config, image_size=image_size)
    config.init_towers = ()  # every tower from init_from (which holds the T5 tokenizer)
    config.data.batch_size = 32  # global: 1 per chip on 32 chips
    config.data.buckets.update(dict(  # precompute writes them, training reads them back
        pixels=image_size * image_size,  # each bucket's pixel budget
        step=64,  # sides in multiples of 64 (the VAE's 8 x the 2x2 patches, rounded up)
        max_aspect=2.0,  # wider images go to the widest bucket
    ))
    config.training.update(dict(
        learning_rate=1e-5,  # a full fine-tune's (LoRA's: 1e-4)
        warmup_steps=100,  # linear warm-up from 0, in optimizer steps
        weight_decay=1e-2,  # AdamW's decoupled weight decay
        ema_decay=0.0,  # no EMA copy: another float32 transformer (48 GB for Flux-dev)
        min_snr_gamma=0.0,  # SNR weighting is DDPM's; the flow loss is unweighted
        trainable=(r"transformer/.*",),  # the transformer; the text towers and VAE stay frozen
    ))
    config.schedule.update(dict(  # how training draws times and weighs the loss
        time_sampling="logit_normal",  # SD3 paper: logit-normal(0, 1) | uniform | mode
        logit_mean=0.0, logit_std=1.0,
        loss_weighting="none",  # none | sigma_sqrt | cosmap (the SD3 paper's, as diffusers')
    ))
    config.frozen_dtype = "bfloat16"  # T5-XXL alone is 19 GB in float32
    config.sample.sampler = "flow_euler"  # diffusers' FlowMatchEulerDiscreteScheduler
    config.sample.steps = 28  # denoising steps of the sample grids
    return config


def get_config() -> ml_collections.ConfigDict:
    config = flow_finetune_sections(flux_dev.get_config(), image_size=1024)
    config.training.embedded_guidance = 3.5  # Flux-dev's guidance input during training
    config.sample.guidance = 3.5  # Flux-dev's distilled guidance in the sample grids
    return config

"""Fine-tune SDXL base 1.0 at 1024x1024 from a converted checkpoint: the whole U-Net
(2.57 B params) with an EMA copy, both text towers and the VAE frozen, bf16 compute, remat
per U-Net block, every param sharded over every device; SDXL's aspect-ratio buckets near
1024x1024 (832x1216, 1216x832, ... each image encoded at its nearest, one compile per
bucket); data from latents precomputed in those buckets with both text towers (their joined
context, bigG's pooled embedding, each image's size and crop).

    diffusion-jax convert --from diffusers path/to/stable-diffusion-xl-base-1.0 --out ckpt/sdxl
    diffusion-jax precompute --config sdxl_finetune --config.init_from=ckpt/sdxl \\
        --from webdataset 'gs://b/laion/{00000..01023}.tar' --out /data/latents/sdxl-1024
    diffusion-jax train --config sdxl_finetune --workdir gs://b/runs/sdxl-ft \\
        --config.init_from=gs://b/ckpt/sdxl --config.data.path=/gcs/b/latents/sdxl-1024

Per-device memory of the step for 8, 16 and 32 chips: `diffusion-jax bench memory --config
sdxl_finetune --devices N` (BENCHMARKS.md).
"""

import ml_collections

from diffusion_jax.configs import sd15_finetune, sdxl_base


def get_config() -> ml_collections.ConfigDict:
    config = sd15_finetune.finetune_sections(sdxl_base.get_config(), image_size=1024)
    config.init_towers = ("unet", "vae", "text_encoder", "text_encoder_2")  # all from init_from
    config.data.batch_size = 32  # global: 1 per chip on 32 chips (v5p-64, v6e-32)
    config.data.buckets.update(dict(  # precompute writes them, training reads them back
        pixels=1024 * 1024,  # each bucket's pixel budget (SDXL paper, appendix: near 1024^2)
        step=64,  # sides in multiples of 64 (VAE 8 x the U-Net's 3 downsamplings)
        max_aspect=2.0,  # 13 buckets, 1408x704 ... 704x1408; wider images go to the widest
    ))
    config.training.update(dict(
        learning_rate=1e-5,  # diffusers' train_text_to_image_sdxl full fine-tune range
        warmup_steps=500,  # linear warm-up from 0, in optimizer steps
        weight_decay=1e-2,  # AdamW's decoupled weight decay
        ema_decay=0.9999,  # the EMA U-Net is what `sample` and `export` use
        min_snr_gamma=5.0,  # min-SNR-gamma weighting (Hang et al. 2023: 5); 0 disables
        trainable=(r"unet/.*",),  # the whole U-Net; text towers and VAE stay frozen
    ))
    config.dtype = "bfloat16"  # compute dtype; params, AdamW moments and EMA stay float32
    config.remat_policy = "nothing_saveable"  # recompute each U-Net block in the backward
    config.mesh.data = 1  # every param sharded over every chip (ZeRO-3) ...
    config.mesh.fsdp = -1  # ... which the 10.3 GB U-Net + 2 x 10.3 GB AdamW + EMA need
    config.sample.steps = 30  # denoising steps of the sample grids
    return config

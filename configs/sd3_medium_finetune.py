"""Full fine-tune of Stable Diffusion 3 Medium at 1024x1024 from a converted checkpoint: the
whole MMDiT (2.03 B params) in AdamW with an EMA copy, CLIP-L, CLIP-G, T5-XXL and the VAE
frozen in bfloat16, bf16 compute, remat per block, every param sharded over every chip;
rectified flow with logit-normal times (SD3 paper: mean 0, std 1) and shift 3; aspect buckets
near 1024x1024; data from latents precomputed with the three text towers (CLIP-L + CLIP-G's
77 tokens, then T5's 256; both CLIPs' pooled outputs).

    diffusion-jax convert --from diffusers path/to/stable-diffusion-3-medium-diffusers --out ckpt/sd3
    diffusion-jax precompute --config sd3_medium_finetune --config.init_from=ckpt/sd3 \\
        --from webdataset 'gs://b/laion/{00000..01023}.tar' --out /data/latents/sd3-1024
    diffusion-jax train --config sd3_medium_finetune --workdir gs://b/runs/sd3-ft \\
        --config.init_from=gs://b/ckpt/sd3 --config.data.path=/gcs/b/latents/sd3-1024

SD3.5: the same recipe on `sd35_medium.get_config()` or `sd35_large.get_config()`.
"""

import ml_collections

from diffusion_jax.configs import sd3_medium
from diffusion_jax.configs.flux_dev_finetune import flow_finetune_sections


def get_config() -> ml_collections.ConfigDict:
    config = flow_finetune_sections(sd3_medium.get_config(), image_size=1024)
    config.training.ema_decay = 0.9999  # 8 GB more: the EMA MMDiT is what `sample` uses
    config.sample.guidance = 7.0  # SD3's classifier-free guidance in the sample grids
    return config

"""Fine-tune Stable Diffusion 1.5 from a converted checkpoint: frozen VAE and CLIP text tower,
EMA U-Net, bf16 compute, remat, fully sharded params; data from precomputed latents.

    diffusion-jax convert --from diffusers path/to/stable-diffusion-v1-5 --out ckpt/sd15
    diffusion-jax precompute --config sd15_finetune --config.init_from=ckpt/sd15 \\
        --from webdataset 'gs://b/laion/{00000..01023}.tar' --out /data/latents/sd15-512
    gcloud storage cp -r ckpt/sd15 gs://b/ckpt/ && gcloud storage cp -r /data/latents gs://b/
    diffusion-jax train --config sd15_finetune --workdir gs://b/runs/sd15-ft \\
        --config.init_from=gs://b/ckpt/sd15 --config.data.path=/gcs/b/latents/sd15-512

Checkpoints and workdirs may be gs:// URIs; the latents are array_record files, read from a
local path: on TPU VMs, the bucket mounted with gcsfuse at the same path on every worker
(`gcsfuse --implicit-dirs b /gcs/b`). `--dry-run` first: it checks all of it and compiles the
step for the devices you have (or `--devices N` fake ones). An image folder instead of
latents: `--config.data.source=folder`.
"""

import ml_collections

from diffusion_jax.configs import base_training, sd15


def finetune_sections(config: ml_collections.ConfigDict, image_size: int) -> ml_collections.ConfigDict:
    """The fine-tuning recipe on any SD architecture config (sd21_finetune.py uses it too)."""
    base_training.add_training_sections(config)
    config.init_from = ""  # the converted checkpoint (required: the VAE is not trained here)
    config.init_towers = ("unet", "vae", "text_encoder")  # all three start from init_from
    config.data.source = "latents"  # precomputed by `diffusion-jax precompute` | folder | tfds
    config.data.path = ""  # the latents (or image) folder, local or gs://
    config.data.image_size = image_size  # square training side, pixels (latents: as written)
    config.data.random_flip = False  # latents fix the flip at precompute time
    config.data.caption_dropout = 0.1  # unconditional 10%, for classifier-free guidance
    config.data.batch_size = 64  # global: 4 per chip on a v4-32 (16 chips)
    config.data.eval_fraction = 0.01  # folder source: images held out for the eval loss
    config.training.update(dict(
        steps=20_000,  # optimizer steps x gradient_accumulation
        learning_rate=1e-5,  # diffusers' train_text_to_image default
        warmup_steps=500,  # linear warm-up from 0, in optimizer steps
        lr_schedule="constant",  # cosine | constant (after warm-up)
        ema_decay=0.9999,  # the EMA U-Net is what `sample` and `export` use
        min_snr_gamma=5.0,  # min-SNR-gamma weighting (Hang et al. 2023: 5); 0 disables
    ))
    config.dtype = "bfloat16"  # compute dtype; params, optimizer and EMA stay float32
    config.remat_policy = "nothing_saveable"  # recompute each U-Net block in the backward
    # Every param sharded over every device (ZeRO-3): fits any device count. On pods of 64+
    # chips, mesh.fsdp=8 with mesh.data=-1 keeps the all-gathers inside groups of 8.
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.checkpoint.every_steps = 1000  # steps between checkpoints
    config.checkpoint.keep = 3  # the last K checkpoints (plus the best by eval loss)
    config.eval_examples = 1024  # held-out examples for the eval loss
    config.sample_every_steps = 2000  # sample grids during training (and at the end)
    return config


def get_config() -> ml_collections.ConfigDict:
    return finetune_sections(sd15.get_config(), image_size=512)

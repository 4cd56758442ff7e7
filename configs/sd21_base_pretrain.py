"""Pretrain the SD 2-base U-Net from scratch the way SD 2 was trained: at 256x256, then at
512x512 from the 256 run's weights; the VAE and the OpenCLIP text tower come frozen from a
converted SD 2 checkpoint. Two runs, one per resolution (`get_config("256")` / `("512")`):

    diffusion-jax train --config sd21_base_pretrain:256 --workdir gs://b/runs/sd2-256 \\
        --config.init_from=gs://b/ckpt/sd21-base --config.data.path=/gcs/b/latents/256
    diffusion-jax train --config sd21_base_pretrain:512 --workdir gs://b/runs/sd2-512 \\
        --config.init_from=gs://b/runs/sd2-256/checkpoints --config.data.path=/gcs/b/latents/512
"""

import ml_collections

from diffusion_jax.configs import base_training, sd21_base

# resolution -> (U-Net steps, global batch), SD 2-base's: 550k at 256, 850k at 512, batch
# 2048 (16 per chip on a v4-256; on a smaller slice use training.gradient_accumulation).
PHASES = {
    "256": (550_000, 2048),
    "512": (850_000, 2048),
}


def get_config(resolution: str = "256") -> ml_collections.ConfigDict:
    if resolution not in PHASES:
        raise ValueError(f"sd21_base_pretrain:{resolution}: the phases are "
                         f"{', '.join(PHASES)} (e.g. --config sd21_base_pretrain:256)")
    steps, batch = PHASES[resolution]
    config = base_training.add_training_sections(sd21_base.get_config())
    config.init_from = ""  # 256: a converted SD 2 checkpoint; 512: the 256 run's checkpoints
    # 256: the U-Net starts from random weights; 512: it continues the 256 run's.
    config.init_towers = ("vae", "text_encoder") if resolution == "256" else (
        "unet", "vae", "text_encoder")
    config.data.source = "latents"  # precomputed at this resolution (diffusion-jax precompute)
    config.data.path = ""  # the latents folder, local or gs://
    config.data.image_size = int(resolution)  # square training side, pixels
    config.data.random_flip = False  # latents fix the flip at precompute time
    config.data.caption_dropout = 0.1  # unconditional 10%, for classifier-free guidance
    config.data.batch_size = batch  # global
    config.training.update(dict(
        steps=steps,  # optimizer steps x gradient_accumulation
        learning_rate=1e-4,  # SD 2's base learning rate
        warmup_steps=10_000,  # linear warm-up from 0
        lr_schedule="constant",  # cosine | constant (after warm-up)
        weight_decay=0.0,  # the LDM recipe uses plain Adam
        ema_decay=0.9999,  # the EMA U-Net is what `sample` and `export` use
    ))
    config.dtype = "bfloat16"  # compute dtype; params, optimizer and EMA stay float32
    config.remat_policy = "nothing_saveable"  # recompute each U-Net block in the backward
    config.mesh.data = -1  # data parallel over the hosts' groups ...
    config.mesh.fsdp = 4  # ... each U-Net param and its Adam state split 4 ways
    config.checkpoint.every_steps = 5000  # steps between checkpoints
    config.checkpoint.keep = 3  # the last K checkpoints (plus the best by eval loss)
    config.eval_every_steps = 5000  # steps between held-out losses
    config.sample_every_steps = 10_000  # sample grids during training (and at the end)
    return config

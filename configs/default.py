"""The embedded CPU demo (the README's main job): text-to-image on Fashion-MNIST.

Stage 1 trains a small VAE (32x32x3 images -> 8x8x4 latents); stage 2 trains a small
text-conditioned latent-diffusion U-Net on its latents with captions "a photo of a sneaker".
Both fit a 2-core CPU in minutes. Every other training config starts from this one.
"""

import ml_collections

from diffusion_jax.configs import base_training, sd15


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()  # SD 1.x structure and schedule, shrunk below

    # ---------------------------------------------------------------- models
    config.vae.update(dict(
        down_block_types=("DownEncoderBlock2D",) * 3,  # 3 levels: 4x downsampling
        up_block_types=("UpDecoderBlock2D",) * 3,  # the decoder's mirror
        block_out_channels=(16, 32, 32),  # encoder channels per level (decoder: reversed)
        layers_per_block=1,  # ResNets per encoder level; the decoder has one more
        norm_num_groups=8,  # GroupNorm groups; divides every block_out_channels entry
        sample_size=32,  # the training image side (= data.image_size)
        scaling_factor=1.0,  # replaced after stage 1 by 1/std of the training latents
    ))
    config.unet.update(dict(
        sample_size=8,  # latent side
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # 8x8, 4x4
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),  # the mirror, 4x4 first
        block_out_channels=(32, 64),  # channels per level
        layers_per_block=1,  # ResNet + attention layers per level; the up path has one more
        attention_head_dim=(4, 4),  # heads per block
        cross_attention_dim=64,  # = text_encoder.hidden_size
        norm_num_groups=8,  # GroupNorm groups; divides every block_out_channels entry
    ))
    config.text_encoder.update(dict(
        hidden_size=64,  # token width (= unet.cross_attention_dim)
        intermediate_size=128,  # MLP hidden width
        num_hidden_layers=2,  # transformer layers
        num_attention_heads=4,  # 16 channels per head
        max_position_embeddings=16,  # class captions are <= 8 tokens
    ))
    config.tokenizer.max_length = 16  # ids per caption (<= text_encoder.max_position_embeddings)
    base_training.add_training_sections(config)

    # ---------------------------------------------------------------- data
    # default_data_config()'s values: bundled Fashion-MNIST, 32x32, batch 64
    config.data.random_flip = False  # clothes have a handedness (shoes point left)

    # ---------------------------------------------------------------- stage 1: VAE
    config.vae_training.update(dict(
        steps=500,  # 0 skips the stage (a VAE from --config.init_from is kept as it is)
        batch_size=32,  # global; the U-Net stage uses data.batch_size
        learning_rate=2e-3,  # peak AdamW learning rate, then cosine decay to 0 at the last step
        warmup_steps=50,  # linear warm-up from 0
        reconstruction_loss="l1",  # l1 | l2, per pixel
        kl_weight=1e-4,  # per latent element relative to per-pixel reconstruction
    ))
    # ---------------------------------------------------------------- stage 2: diffusion
    config.training.update(dict(
        steps=1300,  # U-Net optimizer steps x gradient_accumulation
        learning_rate=1e-3,  # peak AdamW learning rate (reached after warmup_steps)
        warmup_steps=200,  # linear warm-up from 0, in optimizer steps
        lr_schedule="cosine",  # cosine | constant (after warm-up)
        weight_decay=0.0,  # AdamW's decoupled weight decay, on every trained param
        adam_b1=0.9,  # AdamW first-moment (momentum) decay
        adam_b2=0.999,  # AdamW second-moment decay
        grad_clip_norm=1.0,  # global-norm clipping; 0 disables
        gradient_accumulation=1,  # micro-batches per optimizer step (optax.MultiSteps)
        ema_decay=0.999,  # max EMA decay; warm-up min(decay, (1+n)/(10+n)) as diffusers
        min_snr_gamma=5.0,  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 disables
        offset_noise=0.0,  # strength of per-channel offset noise; 0 disables
        # No pretrained CLIP exists on this machine: a frozen random text tower still maps
        # each caption to a distinct fixed embedding that cross-attention learns to read;
        # training it too costs time and buys nothing for ten class captions.
        train_text_encoder=False,  # True: the optimizer updates the text tower too
    ))
    config.dtype = "float32"  # compute dtype: bfloat16 gains nothing on a CPU
    # ---------------------------------------------------------------- checkpoints and logs
    config.checkpoint.update(dict(
        every_steps=250,  # steps between checkpoints, counted per stage; each stage's end too
        keep=2,  # the last K checkpoints ...
        keep_best=1,  # ... plus the best K by eval loss
    ))
    config.eval_every_steps = 500  # steps between held-out losses (also at each stage's end)
    config.eval_examples = 512  # held-out examples for the eval loss
    config.sample_every_steps = 1000  # U-Net stage; 0: only at the end
    config.sample.update(dict(
        # The grid's rows: one caption per Fashion-MNIST class.
        prompts=tuple(f"a photo of {a} {name}" for a, name in (
            ("a", "t-shirt"), ("a", "trouser"), ("a", "pullover"), ("a", "dress"), ("a", "coat"),
            ("a", "sandal"), ("a", "shirt"), ("a", "sneaker"), ("a", "bag"), ("an", "ankle boot"))),
        seeds_per_prompt=8,  # the grid's columns: seeds 0 .. n-1
        sampler="dpmpp_2m",  # a samplers.SAMPLERS name, optionally + "_karras"
        steps=20,  # denoising steps
        guidance=3.0,  # classifier-free guidance scale (1: conditional only); negative prompt ""
    ))
    # Final evaluation (0 disables each): class accuracy of samples by a Fashion-MNIST
    # classifier (a CPU stand-in for CLIP score) and FID against the held-out split. The
    # Inception runs at ~5 images/s on 2 CPU cores, hence small FID sample counts here (FID
    # from fewer than 2048 samples is biased upward: compare runs at equal counts only).
    config.final_eval.update(dict(
        samples_per_class=50,  # samples per class (10 classes) scored by the classifier
        fid_samples=250,  # generated images for FID, captions cycling through the classes
        fid_reference_examples=500,  # test-split images in the (cached) reference statistics
    ))
    return config

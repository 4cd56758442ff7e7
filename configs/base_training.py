"""The sections every training config has, added to an architecture config (sd15.py, ...).

`add_training_sections(sd15.get_config())` is a complete training config; default.py (the CPU
demo) and the *_finetune.py / *_pretrain.py files each change what their run needs. The
values here are neutral defaults for a real run on an accelerator; every field is checked by
`diffusion-jax train --dry-run` (diffusion_jax/training/preflight.py).
"""

import ml_collections

from diffusion_jax.data.input_pipeline import default_data_config
from diffusion_jax.parallel import default_mesh_config


def add_training_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.data = default_data_config()  # source, path, image size, augmentation, global batch
    # ---------------------------------------------------------------- stage 1: VAE
    config.vae_training = dict(
        steps=0,  # 0 skips the stage (a VAE from --config.init_from is kept as it is)
        batch_size=32,  # global; the U-Net stage uses data.batch_size
        learning_rate=1e-4,  # peak AdamW learning rate, then cosine decay to 0 at the last step
        warmup_steps=500,  # linear warm-up from 0
        reconstruction_loss="l1",  # l1 | l2, per pixel
        kl_weight=1e-6,  # per latent element relative to per-pixel reconstruction
        trainable=(r"vae/.*",),  # regexes over param paths "tower/sub/.../leaf": what it trains
    )
    # ---------------------------------------------------------------- stage 2: diffusion
    config.training = dict(
        steps=10_000,  # U-Net optimizer steps x gradient_accumulation
        learning_rate=1e-5,  # peak AdamW learning rate (reached after warmup_steps)
        warmup_steps=500,  # linear warm-up from 0, in optimizer steps
        lr_schedule="constant",  # cosine | constant (after warm-up)
        weight_decay=1e-2,  # AdamW's decoupled weight decay, on every trained param
        adam_b1=0.9,  # AdamW first-moment (momentum) decay
        adam_b2=0.999,  # AdamW second-moment decay
        grad_clip_norm=1.0,  # global-norm clipping; 0 disables
        gradient_accumulation=1,  # micro-batches per optimizer step (optax.MultiSteps)
        ema_decay=0.9999,  # max EMA decay, warm-up min(decay, (1+n)/(10+n)) as diffusers; 0: no EMA
        min_snr_gamma=0.0,  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 disables
        offset_noise=0.0,  # strength of per-channel offset noise; 0 disables
        # Flux.1-dev's distilled guidance, an input of its transformer, during training
        # (diffusers' train_dreambooth_flux --guidance_scale); other denoisers have none.
        embedded_guidance=3.5,
        train_text_encoder=False,  # True: the optimizer updates the text tower too
        # Regexes fully matching param paths "tower/sub/.../leaf" (r"unet/.*lora.*" for LoRA):
        # the params the optimizer updates (train_text_encoder adds r"text_encoder/.*") ...
        trainable=(r"unet/.*",),
        ema=(r".*",),  # ... and those of them that keep an EMA copy (with ema_decay > 0)
    )
    config.dtype = "bfloat16"  # compute dtype: float32 | bfloat16 (params stay float32)
    # The towers no stage trains (a LoRA run's base, a fine-tune's VAE and text tower), on
    # the devices: float32 | bfloat16 (half their memory). Saved once, as loaded, in
    # WORKDIR/frozen.
    config.frozen_dtype = "float32"
    config.remat_policy = ""  # "" (none) or a jax.checkpoint_policies name, per U-Net block
    # Attention kernel: "" the platform's (chunked on CPU, jax.nn.dot_product_attention on
    # GPU / TPU), or chunked | splash (the Pallas TPU kernel) | xla | cudnn.
    config.attention = ""
    config.seed = 0  # param init, training noise and timesteps (data order: data.seed)
    config.init_from = ""  # a checkpoint DIR whose model params start the run
    # Which towers init_from supplies (names of the system's towers; () = all of them); the
    # others start from random weights (seed).
    config.init_towers = ()
    # ---------------------------------------------------------------- parallelism
    config.mesh = default_mesh_config()  # data x fsdp device mesh; default: pure data parallel
    # ---------------------------------------------------------------- checkpoints and logs
    config.checkpoint = dict(
        every_steps=1000,  # steps between checkpoints, counted per stage; each stage's end too
        keep=2,  # the last K checkpoints ...
        keep_best=1,  # ... plus the best K by best_metric
        # eval_loss, or a final_eval metric run every final_eval.every_steps: fid | kid
        # (lower is better), class_accuracy | clip_score (higher is better)
        best_metric="eval_loss",
    )
    config.log_every_steps = 50  # steps between train logs (TensorBoard, metrics.jsonl), NaN checks
    config.eval_every_steps = 1000  # steps between held-out losses (also at each stage's end)
    config.eval_examples = 512  # held-out examples for the eval loss
    config.sample_every_steps = 2000  # U-Net stage; 0: only at the end
    config.sample = dict(
        prompts=("a photograph of an astronaut riding a horse", "a watercolor of a lighthouse",
                 "a bowl of fruit on a wooden table", "a city street at night in the rain"),
        seeds_per_prompt=4,  # the grid's columns: seeds 0 .. n-1
        sampler="dpmpp_2m",  # a samplers.SAMPLERS name, optionally + "_karras"
        steps=25,  # denoising steps
        guidance=7.5,  # classifier-free guidance scale (1: conditional only); negative prompt ""
    )
    # Evaluations after training, and every every_steps U-Net steps (0 disables each):
    # class accuracy of samples by a Fashion-MNIST classifier (needs data.source=fashion_mnist),
    # FID and KID against a reference, CLIP score. Logged to TensorBoard (eval/*),
    # metrics.jsonl and summary.json.
    config.final_eval = dict(
        samples_per_class=0,  # samples per class (10 classes) scored by the classifier
        fid_samples=0,  # generated images for FID (and KID)
        # fashion_mnist (its test split; captions cycle through the classes), or an image
        # folder / statistics or features .npz (diffusion-jax fid's sources; sample.prompts)
        fid_reference="fashion_mnist",
        fid_reference_examples=500,  # fashion_mnist: test-split images in the reference
        clip_score_samples=0,  # generated images of sample.prompts (cycled) for CLIP score
        clip_model="",  # a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14)
        every_steps=0,  # also every K U-Net steps (a multiple of checkpoint.every_steps); 0: at the end
    )
    return config

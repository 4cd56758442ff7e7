"""configs/flux_schnell.py's system shrunk to seconds: a Flux.1-shaped transformer (double-
and single-stream blocks, RoPE, 2x2 packing; schnell's: no guidance embedder) fine-tuned with
rectified flow on the tiny 16-channel VAE's latents of Fashion-MNIST, CLIP's pooled output
and T5's tokens. Tests and smoke runs of Flux training.

    diffusion-jax train --config tiny_flux_train --workdir runs/flux \\
        --config.init_from=ckpt/tiny_flux     # a checkpoint of this architecture

No T5 vocabulary ships with diffusion_jax: the T5 tokenizer is init_from's (a converted
checkpoint keeps its folder's tokenizer.json), so init_from is required.
"""

import ml_collections

from diffusion_jax.configs import flux_schnell, tiny_train


def fine_tune_from_init(config: ml_collections.ConfigDict,
                        family: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tiny flow-transformer fine-tune (tiny_sd3_train.py uses it too): the tiny VAE at
    16 latent channels with `family`'s latent scaling, every tower from init_from (which
    holds the T5 tokenizer), the transformer alone trained, four steps."""
    config.vae.update(dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                           scaling_factor=family.vae.scaling_factor,
                           shift_factor=family.vae.shift_factor))
    config.init_from = ""  # required: --config.init_from=CKPT (its T5 tokenizer)
    config.init_towers = ()  # every tower from init_from
    config.vae_training.steps = 0  # the VAE comes from init_from
    config.training.update(dict(trainable=(r"transformer/.*",), min_snr_gamma=0.0,
                                steps=4, ema_decay=0.99))
    config.sample.sampler = "flow_euler"
    config.checkpoint.every_steps = 2
    config.eval_every_steps = 2
    return config


def get_config() -> ml_collections.ConfigDict:
    config = tiny_train.get_config()
    flux = flux_schnell.get_config()
    del config["unet"]
    for name in ("system", "schedule", "text_encoder_2", "tokenizer_2"):
        config[name] = flux[name].to_dict()
    config.transformer = dict(
        flux.transformer.to_dict(),
        num_layers=1, num_single_layers=1,  # one double- and one single-stream block
        num_attention_heads=2, attention_head_dim=8,  # 16 wide
        axes_dims_rope=(2, 2, 4),  # (text, row, column) RoPE widths: sum to the head width
        joint_attention_dim=32,  # = text_encoder_2.d_model
        pooled_projection_dim=16,  # = text_encoder.hidden_size
    )
    config.text_encoder_2.update(dict(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                      num_heads=4))
    config.tokenizer_2.max_length = 32  # T5 tokens per caption
    return fine_tune_from_init(config, flux)

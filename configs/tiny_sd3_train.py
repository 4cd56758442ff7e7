"""configs/sd3_medium.py's system shrunk to seconds: an SD3-shaped MMDiT fine-tuned with
rectified flow on the tiny 16-channel VAE's latents of Fashion-MNIST, conditioned on CLIP-L
and CLIP-G (their penultimate features side by side, zero-padded to T5's width, then T5's
tokens; both pooled projections). Tests and smoke runs of SD3 training.

    diffusion-jax train --config tiny_sd3_train --workdir runs/sd3 \\
        --config.init_from=ckpt/tiny_sd3     # a checkpoint of this architecture

As for Flux, the T5 tokenizer is init_from's, so init_from is required.
"""

import ml_collections

from diffusion_jax.configs import sd3_medium, tiny_train
from diffusion_jax.configs.tiny_flux_train import fine_tune_from_init


def get_config() -> ml_collections.ConfigDict:
    config = tiny_train.get_config()
    sd3 = sd3_medium.get_config()
    del config["unet"]
    for name in ("system", "schedule", "text_encoder", "text_encoder_2", "text_encoder_3",
                 "tokenizer", "tokenizer_2", "tokenizer_3"):
        config[name] = sd3[name].to_dict()
    config.transformer = dict(
        sd3.transformer.to_dict(), sample_size=8, num_layers=2,  # the last context_pre_only
        num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,  # 16 wide
        joint_attention_dim=64,  # = text_encoder_3.d_model
        pooled_projection_dim=8 + 16,  # both CLIPs' projections
        pos_embed_max_size=16)
    clip = dict(intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16)
    config.text_encoder.update(dict(clip, hidden_size=16, projection_dim=8))
    config.text_encoder_2.update(dict(clip, hidden_size=32, projection_dim=16))
    config.text_encoder_3.update(dict(vocab_size=160, d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                      num_heads=2))
    config.tokenizer.max_length = config.tokenizer_2.max_length = 16  # CLIP tokens per caption
    config.tokenizer_3.max_length = 32  # T5 tokens per caption
    return fine_tune_from_init(config, sd3)

"""configs/default.py shrunk to seconds: tests and smoke runs of the whole training path."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.vae.update(dict(block_out_channels=(8, 8, 8), norm_num_groups=4))
    config.unet.update(dict(block_out_channels=(16, 16), attention_head_dim=(2, 2),
                            cross_attention_dim=16, norm_num_groups=4))
    config.text_encoder.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2))
    config.data.batch_size = 8
    config.vae_training.batch_size = 8
    config.vae_training.steps = 6
    config.vae_training.warmup_steps = 2
    config.training.steps = 8
    config.training.warmup_steps = 2
    config.checkpoint.every_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.eval_examples = 16
    config.sample_every_steps = 0
    config.sample.prompts = config.sample.prompts[:2]
    config.sample.seeds_per_prompt = 2
    config.sample.steps = 2
    config.final_eval.samples_per_class = 0
    config.final_eval.fid_samples = 0
    return config

"""The frozen VAE and text encoder of a training config as the numpy -> numpy functions the
precompute pass takes. The one module of `data/` that builds models: precompute is its only
user, and a data pass is where latents are made.

Latents are the VAE posterior's mean times vae.scaling_factor, not a sample of it (diffusers'
training scripts store `latent_dist.sample() * scaling_factor`): the mean is deterministic, so
a rerun or a resumed shard writes the same bytes; records stay half the size of mean + std;
and training uses them as they are (losses.py takes batch["latents"] as x0). What is lost is
the posterior's sampling noise, which the KL term keeps small in the SD VAEs.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import checkpoint, system

log = logging.getLogger(__name__)


def towers(config) -> tuple[str, ...]:
    """The frozen towers precompute runs: the VAE and the text towers of the config's system."""
    described = system.from_config(config)
    return (described.vae.name, *described.text_names)


def describe(config) -> dict:
    """What the latents are made with, as JSON (read from the config only: no weights)."""
    described = {"init_from": config.init_from or f"random init, seed {config.seed}",
                 "latents": "posterior mean * vae.scaling_factor",
                 "scaling_factor": float(config.vae.scaling_factor), "dtype": config.dtype}
    if time_ids(config) is not None:  # SD's settings stay as they were before SDXL
        described["micro_conditioning"] = True
    return described


def text_inputs(config) -> system.TextInputs:
    """Every text tower's tokenizer: the ids the records hold (a T5 tower's vocabulary is
    init_from's, as in training)."""
    sections = _sections(config, system.from_config(config).config_sections)
    checkpoint.fill_t5_vocabularies(sections, config.get("init_from"))
    return system.text_inputs(system.from_config(config), sections)


def time_ids(config):
    """(original size, crop) -> time_ids at data.image_size for a U-Net with SDXL's
    micro-conditioning (the records then keep each image's size and crop); else None."""
    return system.time_ids_fn(system.from_config(config), config, config.data.image_size,
                              config.data.aesthetic_score)


def load_params(config) -> dict:
    """The `towers(config)` params ({"vae", "text_encoder"} for SD): from config.init_from, else the trainer's seeded
    random init, the very weights a run of this config without init_from starts from (tests;
    warns, as such latents train nothing useful)."""
    names = towers(config)
    sections = _sections(config, names)
    if config.init_from:
        saved = checkpoint.read_config(config.init_from)
        differ = checkpoint.architecture_differences(saved, sections, names)
        if differ:
            raise ValueError(f"--config.init_from={config.init_from!r}: its architecture differs "
                             f"from this config's ({'; '.join(differ[:4])}); make them equal")
    else:
        log.warning("config.init_from is empty: the latents are from RANDOM weights (seed %d); "
                    "set --config.init_from=CHECKPOINT_DIR for real ones", config.seed)
    return checkpoint.initial_params(sections, seed=config.seed, init_from=config.init_from,
                                     names=names)


def _sections(config, names) -> dict:
    """The `names` sections of the config as dicts, with its system description (a config
    without one is SD 1.x/2.x's)."""
    names = (*names, *(["system"] if "system" in config else []))
    return {name: config[name].to_dict() if hasattr(config[name], "to_dict") else config[name]
            for name in names}


def _on_local_devices(fn, params) -> Callable[[Any], Any]:
    """fn(params, rows) jitted with the rows (an array or a dict of arrays, one batch) split
    over this process's devices (padded to a multiple of their count) and the params
    replicated; numpy in, float32 numpy out (an array or a dict, as fn returns)."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("rows",))
    rows, replicated = NamedSharding(mesh, PartitionSpec("rows")), NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    jitted = jax.jit(fn, in_shardings=(replicated, rows), out_shardings=rows)

    def call(x):
        n = len(jax.tree.leaves(x)[0])
        pad = -n % len(devices)
        padded = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])
                              if pad else a, x)
        return jax.tree.map(lambda a: np.asarray(a, np.float32)[:n], jitted(params, padded))

    return call


def frozen_encoders(config, params: dict) -> tuple[Callable, Callable]:
    """(encode: images float32 [B, H, W, 3] in [-1, 1] -> latents [B, h, w, c],
    text: {ids key: int32 [B, L]} -> the conditioning {"context": [B, L, D][, "pooled":
    [B, P]]}), in config.dtype: the system's VAE (posterior mean, shifted and scaled as the
    denoiser sees it) and its text towers' `system.encode_text`, every tower at once."""
    described = system.from_config(config)
    models = system.build(described, config, dtype=jnp.dtype(config.dtype))
    vae_name = described.vae.name

    def latents(p, images):
        return system.encode_latents(models, {vae_name: p}, images, rng=None)

    def cond(p, ids):
        return system.encode_text(models, p, ids)

    return (_on_local_devices(latents, params[vae_name]),
            _on_local_devices(cond, {n: params[n] for n in described.text_names}))

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
from typing import Callable

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
    return {"init_from": config.init_from or f"random init, seed {config.seed}",
            "latents": "posterior mean * vae.scaling_factor",
            "scaling_factor": float(config.vae.scaling_factor), "dtype": config.dtype}


def load_params(config) -> dict:
    """The `towers(config)` params ({"vae", "text_encoder"} for SD): from config.init_from, else the trainer's seeded
    random init, the very weights a run of this config without init_from starts from (tests;
    warns, as such latents train nothing useful)."""
    names = towers(config)
    sections = {name: config[name].to_dict() for name in names}
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


def _on_local_devices(fn, params) -> Callable[[np.ndarray], np.ndarray]:
    """fn(params, rows) jitted with the rows split over this process's devices (padded to a
    multiple of their count) and the params replicated; numpy in, float32 numpy out."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("rows",))
    rows, replicated = NamedSharding(mesh, PartitionSpec("rows")), NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    jitted = jax.jit(fn, in_shardings=(replicated, rows), out_shardings=rows)

    def call(x: np.ndarray) -> np.ndarray:
        pad = -len(x) % len(devices)
        padded = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
        return np.asarray(jitted(params, padded), np.float32)[:len(x)]

    return call


def frozen_encoders(config, params: dict) -> tuple[Callable, Callable]:
    """(encode: images float32 [B, H, W, 3] in [-1, 1] -> latents [B, h, w, c],
    text: input_ids int32 [B, L] -> context [B, L, D]), in config.dtype: the system's VAE
    (posterior mean, shifted and scaled as the denoiser sees it) and its text tower's
    cond["context"]. The records hold one tower's `input_ids`, so one text tower only."""
    described = system.from_config(config)
    if len(described.text_towers) != 1:
        raise ValueError(f"precompute writes one text tower's ids; this system has "
                         f"{list(described.text_names)}")
    models = system.build(described, config, dtype=jnp.dtype(config.dtype))
    (ids_key,) = described.ids_keys
    vae_name = described.vae.name

    def latents(p, images):
        return system.encode_latents(models, {vae_name: p}, images, rng=None)

    def context(p, input_ids):
        return system.encode_text(models, p, {ids_key: input_ids})["context"]

    return (_on_local_devices(latents, params[vae_name]),
            _on_local_devices(context, {n: params[n] for n in described.text_names}))

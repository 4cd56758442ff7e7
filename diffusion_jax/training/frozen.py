"""The towers no stage of a run trains: saved once, and optionally held in bfloat16.

A LoRA run's base (only its `lora` item trains), a ControlNet run's U-Net, VAE and text
tower, a fine-tune's VAE and text tower never change. The trainer writes them once, as
loaded, to WORKDIR/frozen (a checkpoint of their own, step 0), and each step's checkpoint
names them in its config (checkpoint.FROZEN_KEY) instead of holding them again: an SD 1.5
LoRA step is its factors and their optimizer state, not 4 GB of base. `load`, `sample`,
`export` and a resume read them through that name.

`frozen_dtype = "bfloat16"` then holds them in bfloat16 on the devices (half the base's
memory; diffusers' training scripts' `weight_dtype`): the steps, sample grids and evaluations
see those weights, while the saved copy stays as it was loaded.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from etils import epath

from diffusion_jax import checkpoint, system
from diffusion_jax.training import partition

FOLDER = "frozen"  # beside WORKDIR/checkpoints
DTYPES = ("float32", "bfloat16", "float16")


def names(config, ckpt_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The system's towers of which no stage that runs trains a single param."""
    from diffusion_jax.training import preflight
    from diffusion_jax.training.trainer import STAGES

    shapes = preflight.abstract_towers(ckpt_config)
    trained = set()
    for stage in STAGES:
        if stage.steps(config):
            trained.update(partition.split(shapes, stage.trainable(config))[0])
    return tuple(n for n in system.from_config(ckpt_config).names if n not in trained)


def dtype(config) -> jnp.dtype:
    return jnp.dtype(config.get("frozen_dtype") or "float32")


def cast(towers: Mapping[str, Any], frozen: tuple[str, ...], to: jnp.dtype) -> dict:
    """`towers` with the floating-point leaves of the `frozen` towers in dtype `to`: arrays
    (each keeps its sharding) or jax.ShapeDtypeStructs (the dry run's)."""
    def leaf(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == to:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, to, sharding=x.sharding)
        return jax.jit(lambda a: a.astype(to), out_shardings=x.sharding)(x)

    return {n: jax.tree_util.tree_map(leaf, t) if n in frozen else t
            for n, t in towers.items()}


def folder(workdir: epath.Path) -> epath.Path:
    return workdir / FOLDER


def reference(frozen: tuple[str, ...]) -> dict:
    """What a step's config says of the towers it does not hold."""
    return {checkpoint.FROZEN_KEY: {"folder": FOLDER, "items": list(frozen)}} if frozen else {}


def save_once(workdir: epath.Path, towers: Mapping[str, Any], frozen: tuple[str, ...],
              ckpt_config: Mapping[str, Any], fresh: bool) -> None:
    """Writes the `frozen` towers (as loaded: before any cast) to WORKDIR/frozen unless it
    holds them. A fresh run replaces what a run killed before its first checkpoint left
    (its init_from may have changed since); a resumed one keeps it."""
    if not frozen:
        return
    path = folder(workdir)
    stale = fresh and path.exists()
    _barrier("frozen-checked")  # every process looked before any writes
    if stale:
        if jax.process_index() == 0:
            path.rmtree()
        _barrier("frozen-removed")
    try:
        held, latest = checkpoint.item_names(path), checkpoint.steps(path)[-1]
    except checkpoint.CheckpointError:  # absent, or a write killed half-way (a tmp folder)
        held, latest = [], -1
    if not set(frozen) <= set(held):  # a resumed run whose config froze another tower
        checkpoint.save(path, latest + 1, {n: towers[n] for n in frozen}, ckpt_config)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

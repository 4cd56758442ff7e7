"""Where a run starts: its towers from init_from and the seed (a fresh run) or from the
newest checkpoint (a resumed one), on the devices; the frozen towers saved once and cast
(frozen.py) either way. The optimizer state is the stage's (trainer._resumed_state).
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from diffusion_jax import checkpoint, parallel
from diffusion_jax.adapters import lora_train
from diffusion_jax.training import frozen as frozen_towers
from diffusion_jax.training import preflight

log = logging.getLogger("diffusion_jax.train")

TRAINER_ITEM = "trainer"  # JSON: the stage, its step, the data iterators' states, the scaling


def _latent_scaling_from_init(run) -> None:
    """A VAE from init_from that no VAE stage retrains keeps the latent scaling it was
    trained or converted with (the demo's is measured after its stage 1, not in a config)."""
    config, vae = run.config, run.system.vae.name
    if not config.init_from or vae not in preflight.init_towers(config) or \
            preflight.stage_steps(config)["vae"]:
        return
    saved = checkpoint.read_config(config.init_from)[vae]
    for key in ("scaling_factor", "shift_factor"):
        if saved.get(key) is not None:
            run.ckpt_config[vae][key] = saved[key]


def start(run) -> dict | None:
    """Loads the towers (and their EMA copies) from the newest checkpoint, or initialises
    them, and says where the interrupted stage stands; None on a fresh run."""
    step = run.checkpointer.latest_step()
    if step is None:
        run.towers = _initial_towers(run)
        _latent_scaling_from_init(run)
        trainer = None
    else:
        trainer = _restore_towers(run, step)
    frozen_towers.save_once(run.workdir, run.towers, run.frozen, run.ckpt_config,
                            fresh=step is None)
    run.towers = frozen_towers.cast(run.towers, run.frozen, frozen_towers.dtype(run.config))
    if trainer is None:
        return None
    log.info("resuming from %s step %d (%s stage, step %d of %d)", run.checkpointer.directory,
             step, trainer["stage"], trainer["stage_step"], run.stage_steps(trainer["stage"]))
    return {**trainer, "step": step}


def _shardings(run, tree: Any) -> Any:
    return parallel.param_shardings(tree, run.mesh, run.config.mesh.fsdp_min_size)


def _initial_towers(run) -> dict:
    """The towers of a fresh run, from init_from and the seed, on the devices."""
    config = run.config
    towers = checkpoint.initial_params(run.ckpt_config, seed=config.seed,
                                       init_from=config.init_from,
                                       from_checkpoint=preflight.init_towers(config))
    if lora_train.adapter_items(run.ckpt_config):  # after the towers, as init_params numbers them
        towers[lora_train.ITEM] = lora_train.init(run.ckpt_config, jax.random.fold_in(
            jax.random.key(config.seed), len(run.system.towers)))
    return parallel.shard_params(towers, _shardings(run, towers))


def _restore_towers(run, step: int) -> dict:
    """run.towers and run.ema from checkpoint `step` (the frozen towers from the folder its
    config names); its `trainer` item."""
    directory = run.checkpointer.directory
    saved = checkpoint.item_names(directory, step)
    templates = preflight.abstract_towers(run.ckpt_config)
    names = tuple(templates)
    ema_items = {name + checkpoint.EMA_SUFFIX: name for name in names
                 if name + checkpoint.EMA_SUFFIX in saved}
    templates.update({item: templates[name] for item, name in ema_items.items()})
    abstract = {n: parallel.abstract(t, _shardings(run, t)) for n, t in templates.items()}
    source = checkpoint.frozen_source(directory, checkpoint.read_config(directory, step))
    elsewhere = {n: abstract.pop(n) for n in (source[1] if source else ())}
    restored = run.checkpointer.restore(step, abstract, [TRAINER_ITEM])
    if elsewhere:
        restored.update(checkpoint.restore(
            checkpoint.frozen_checkpoint(directory, step, source[0]), elsewhere))
    run.towers = {name: restored[name] for name in names}
    run.ema = {name: restored[item] for item, name in ema_items.items()}
    trainer = restored[TRAINER_ITEM]
    run.ckpt_config[run.system.vae.name]["scaling_factor"] = trainer["scaling_factor"]
    return trainer

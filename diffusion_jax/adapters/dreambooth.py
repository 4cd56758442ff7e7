"""DreamBooth (Ruiz et al. 2022): a subject taught to a model from a few images under an
instance prompt with a rare token ("a photo of sks dog"), and prior preservation: class
images ("a photo of a dog") that the base model itself draws before training, trained
beside them so the class keeps its look.

Every step's batch is `data.batch_size` instance rows followed by as many class rows, the
class rows flagged by `prior` (1.0); the loss is the instance rows' mean plus
`prior_loss_weight` times the class rows' mean (diffusers' train_dreambooth). The class
images are drawn once, by the base from init_from with the run's own sampling pipeline,
into WORKDIR/class_images (a rerun or a resumed run draws only those missing); the held-out
ones give the eval loss: how far training has pulled the model from its prior. It applies
to LoRA runs (configs/dreambooth_sd15.py) and to full fine-tunes alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffusion_jax.data import buckets, input_pipeline

ITEM = "dreambooth"  # the config section
CLASS_IMAGES = "class_images"  # WORKDIR/class_images: the base's class images, NNNNN.png
PRIOR_KEY = "prior"  # the batch rows' flag: 1.0 for a class image

log = logging.getLogger("diffusion_jax.train")


def default_config() -> ml_collections.ConfigDict:
    """The `dreambooth` section of a training config."""
    return ml_collections.ConfigDict(dict(
        instance_prompt="a photo of sks dog",  # every instance image's caption (data.path)
        class_prompt="a photo of dog",  # the class images' prompt
        num_class_images=100,  # drawn by the base before training (diffusers' default)
        prior_loss_weight=1.0,  # the class rows' loss weight
        # How the base draws them: a sampler of `diffusion-jax sample`, its steps and CFG.
        sampler="ddim", steps=50, guidance=7.5,
        sample_batch=8,  # images per sampling call
    ))


def section(config: Mapping[str, Any]) -> dict | None:
    """The `dreambooth` section as a dict; None without one."""
    value = config.get(ITEM) if hasattr(config, "get") else None
    if value is None:
        return None
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def step_rows(config, batch_size: int) -> int:
    """A diffusion step's rows: a DreamBooth run's `batch_size` instance rows are followed
    by as many class rows."""
    return 2 * batch_size if section(config) is not None else batch_size


def check(config) -> None:
    """One-line errors for a DreamBooth section that cannot run."""
    db = section(config)
    if db is None:
        return
    fail = lambda key, why: ValueError(f"--config.dreambooth.{key}={db[key]!r}: {why}")
    if not db["instance_prompt"].strip():
        raise fail("instance_prompt", "must name the subject with a rare token, e.g. "
                   "'a photo of sks dog'")
    if buckets.enabled(config.data.buckets):
        raise ValueError("--config.data.buckets: DreamBooth trains at data.image_size (its "
                         "class images are square); set data.buckets.pixels=0")
    if config.data.source != "folder":
        raise ValueError(f"--config.data.source={config.data.source!r}: DreamBooth trains on a "
                         "folder of instance images (data.source='folder', data.path=DIR)")
    if not config.get("init_from"):
        raise ValueError("--config.init_from is empty: DreamBooth fine-tunes a base model (and "
                         "draws its class images with it); set it to a checkpoint")
    without_prior = ("without prior preservation DreamBooth is a fine-tune on the instance "
                     "folder under one caption: drop the dreambooth section and set "
                     "--config.data.caption to the instance prompt")
    if not db["class_prompt"].strip():
        raise fail("class_prompt", "is empty; " + without_prior)
    if db["prior_loss_weight"] <= 0:
        raise fail("prior_loss_weight", "must be > 0; " + without_prior)
    if db["num_class_images"] < config.data.batch_size:
        raise fail("num_class_images", f"fewer than one batch of class rows "
                   f"(data.batch_size={config.data.batch_size})")
    for key in ("steps", "sample_batch"):
        if db[key] < 1:
            raise fail(key, "must be >= 1")


def instance_data(data_config: ml_collections.ConfigDict, db: Mapping[str, Any]
                  ) -> ml_collections.ConfigDict:
    """The instance images: every file of data.path trains, under the instance prompt."""
    data = ml_collections.ConfigDict(data_config.to_dict())
    data.caption, data.eval_fraction = db["instance_prompt"], 0.0
    return data


def class_data(data_config: ml_collections.ConfigDict, db: Mapping[str, Any],
               workdir) -> ml_collections.ConfigDict:
    """The class images: the base's, under the class prompt; their own shuffle seed, and
    data.eval_fraction of them held out for the eval loss."""
    data = ml_collections.ConfigDict(data_config.to_dict())
    data.path = str(epath.Path(workdir) / CLASS_IMAGES)
    data.caption, data.seed = db["class_prompt"], data_config.seed + 1000
    data.condition = ""
    return data


def class_image_path(workdir, index: int) -> epath.Path:
    return epath.Path(workdir) / CLASS_IMAGES / f"{index:05d}.png"


def missing_class_images(workdir, count: int) -> list[int]:
    return [i for i in range(count) if not class_image_path(workdir, i).exists()]


def draw_class_images(run, params_fn) -> int:
    """Draws the class images WORKDIR/class_images lacks with `params_fn()` (the base's
    params, read only if one is missing), seed i for image i, each PNG with its recipe;
    every process calls it (the sampling program spans their devices), process 0 writes.
    Returns how many were drawn."""
    import diffusion_jax
    from diffusion_jax import image_files

    db = section(run.config)
    missing = missing_class_images(run.workdir, db["num_class_images"])
    if not missing:
        return 0
    sampler, batch, params = run.sampler(), db["sample_batch"], params_fn()
    (run.workdir / CLASS_IMAGES).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("dreambooth: drawing %d class images of %r with the base (%s, %d steps, "
             "guidance %g)", len(missing), db["class_prompt"], db["sampler"], db["steps"],
             db["guidance"])
    for done in range(0, len(missing), batch):
        seeds = missing[done:done + batch]
        padded = seeds + seeds[-1:] * (batch - len(seeds))  # one compiled shape
        images = sampler.pipe.txt2img([db["class_prompt"]] * batch, "", seed=padded,
                                      sampler=db["sampler"], steps=db["steps"],
                                      guidance=db["guidance"], params=params)
        if run.is_main:
            for seed, image in zip(seeds, np.asarray(images)):
                recipe = {"prompt": db["class_prompt"], "negative_prompt": "",
                          "sampler": db["sampler"], "steps": db["steps"],
                          "guidance": db["guidance"], "eta": 0.0, "height": int(image.shape[0]),
                          "width": int(image.shape[1]), "checkpoint": run.config.init_from,
                          "diffusion_jax_version": diffusion_jax.__version__}
                image_files.save_png(image, class_image_path(run.workdir, seed),
                                     image_files.png_metadata(recipe, [seed]))
        finished = done + len(seeds)
        rate = finished / (time.perf_counter() - start)
        log.info("dreambooth: class images %d/%d, %.2f images/s, ETA %.0f s", finished,
                 len(missing), rate, (len(missing) - finished) / rate)
    return len(missing)


def base_params(run, resumed: bool) -> dict:
    """{tower: params} of the base the run started from: the run's own before its first
    step; on a resumed run, init_from's again (the run's have trained since)."""
    from diffusion_jax import checkpoint
    from diffusion_jax.training import frozen, preflight, trainer

    if not resumed:
        return trainer.sampling_params(run)
    towers = checkpoint.initial_params(run.ckpt_config, seed=run.config.seed,
                                       init_from=run.config.init_from,
                                       from_checkpoint=preflight.init_towers(run.config))
    towers = frozen.cast(towers, run.frozen, frozen.dtype(run.config))  # as the first draw's
    return {name: towers[name] for name in run.system.names}


def stage_data(run, data_config, data_state: dict | None, time_ids, *, process_index: int,
               process_count: int):
    """(train iterator at `data_state`, held-out batches, global rows per step) of a
    DreamBooth run's diffusion stage; first the class images the workdir lacks, drawn by
    the base."""
    db = section(run.config)
    where = dict(process_index=process_index, process_count=process_count, time_ids=time_ids)
    draw_class_images(run, lambda: base_params(run, resumed=data_state is not None))
    classes = class_data(data_config, db, run.workdir)
    iterator = PriorIterator(
        input_pipeline.make_train_iterator(instance_data(data_config, db), run.text_inputs,
                                           **where),
        input_pipeline.make_train_iterator(classes, run.text_inputs, **where))
    if data_state is not None:
        iterator.set_state(data_state)
    eval_batches = input_pipeline.make_eval_batches(
        classes, run.text_inputs, num_examples=run.config.eval_examples,
        batch_size=data_config.batch_size, time_ids=time_ids)
    return iterator, eval_batches, step_rows(run.config, data_config.batch_size)


class PriorIterator:
    """Batches of instance rows followed by class rows, flagged by `prior`; its state is
    both iterators' (a killed run resumes exactly)."""

    def __init__(self, instances, classes):
        self.instances, self.classes = instances, classes

    def __iter__(self) -> PriorIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        instance, prior = next(self.instances), next(self.classes)
        batch = {key: np.concatenate([instance[key], prior[key]]) for key in instance}
        batch[PRIOR_KEY] = np.concatenate([np.zeros(len(instance["label"]), np.float32),
                                           np.ones(len(prior["label"]), np.float32)])
        return batch

    @property
    def stats(self) -> dict[str, Any]:
        return {"instance": self.instances.stats, "class": self.classes.stats}

    def get_state(self) -> dict[str, Any]:
        return {"instance": self.instances.get_state(), "class": self.classes.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"instance", "class"}:
            raise ValueError("the checkpoint's data state is not a DreamBooth run's (instance "
                             "and class iterators): resume with the config it was written "
                             "with, or start a new workdir")
        self.instances.set_state(state["instance"])
        self.classes.set_state(state["class"])

    def close(self) -> None:
        self.instances.close()
        self.classes.close()


def prior_loss(per_example, mse_per_example, prior, weight: float):
    """(the instance rows' mean plus `weight` times the class rows' mean of the per-example
    losses, the two rows' mean squared errors); `prior` 1.0 flags a class row."""
    instance = 1.0 - prior
    mean = lambda values, rows: jnp.sum(rows * values) / jnp.maximum(jnp.sum(rows), 1.0)
    loss = mean(per_example, instance) + weight * mean(per_example, prior)
    return loss, {"instance_mse": mean(mse_per_example, instance),
                  "prior_mse": mean(mse_per_example, prior)}

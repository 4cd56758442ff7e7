"""`sample`: txt2img, img2img, inpaint and the SDXL refiner from a checkpoint, to PNGs with their recipe."""

from __future__ import annotations

import argparse
from typing import Any

from diffusion_jax.cli.common import CHECKPOINT_HELP


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
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
    add_sampler_args(parser)
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
    sd3 = parser.add_argument_group("SD3", "the third (T5) text tower's prompt and length")
    sd3.add_argument("--prompt-3", help="prompt of the T5 tower (default: --prompt)")
    sd3.add_argument("--negative-prompt-3",
                     help="negative prompt of the T5 tower (default: --negative-prompt)")
    sd3.add_argument("--max-sequence-length", type=int,
                     help="T5 tokens per prompt (default: the checkpoint's; SD3: 256, Flux.1: 512)")
    flux = parser.add_argument_group(
        "Flux.1", "--guidance is dev's distilled guidance (diffusers' guidance_scale, 3.5 there), "
                  "not classifier-free; --prompt-2 is T5's prompt")
    flux.add_argument("--true-cfg", type=float,
                      help="classifier-free guidance against --negative-prompt at this scale "
                           "(diffusers' true_cfg_scale; default: 1, none)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="a LoRA merged into the --checkpoint's models at WEIGHT (default "
                             "1.0): kohya / A1111 or diffusers / PEFT .safetensors (.ckpt/.pt "
                             "too, read safely); repeat for several")
    control = parser.add_argument_group(
        "ControlNet", "steer the U-Net with a ControlNet checkpoint (`convert` of a diffusers "
        "ControlNetModel folder or of an original control_*.safetensors file) and its image")
    control.add_argument("--controlnet", metavar="DIR", help="the ControlNet checkpoint")
    control.add_argument("--control-image", metavar="PNG",
                         help="its image (edges, depth, pose, ...), resized to the output")
    control.add_argument("--control-scale", type=float, default=1.0,
                         help="scale of its residuals (default: 1)")
    control.add_argument("--control-start", type=float, default=0.0,
                         help="fraction of the steps where it starts acting (default: 0)")
    control.add_argument("--control-end", type=float, default=1.0,
                         help="fraction of the steps where it stops (default: 1)")
    control.add_argument("--guess-mode", action="store_true",
                         help="its residuals on the positive prompt's half only, scaled up "
                              "from 0.1 at the first skip to 1 at the mid block (diffusers' "
                              "guess_mode)")
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


def flag(option: str) -> str:
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


# The SDXL, SD3 and Flux.1 options of `sample`: pipeline keyword -> which model of an ensemble
# reads it (SD3's have no refiner).
FAMILY_OPTIONS = {"prompt_2": "base", "negative_prompt_2": "base",
                  "original_size": "both", "negative_original_size": "both",
                  "crops_coords_top_left": "both", "negative_crops_coords_top_left": "both",
                  "target_size": "base", "negative_target_size": "base",
                  "aesthetic_score": "refiner", "negative_aesthetic_score": "refiner",
                  "prompt_3": "base", "negative_prompt_3": "base",
                  "max_sequence_length": "base", "true_cfg": "base"}


def _family_options(args: argparse.Namespace, model: str) -> dict:
    """The SDXL and SD3 options given, for the "base" or the "refiner" of an ensemble (or the one
    checkpoint sampled: "single"), as pipeline keywords; sizes as tuples."""
    options = {}
    for key, reader in FAMILY_OPTIONS.items():
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


def _control_options(args: argparse.Namespace) -> dict:
    """The ControlNet options given, as pipeline keywords ({} without --controlnet)."""
    if args.controlnet is None:
        defaults = dict(control_image=None, control_scale=1.0, control_start=0.0,
                        control_end=1.0, guess_mode=False)
        given = [flag(k) for k, default in defaults.items() if getattr(args, k) != default]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --controlnet DIR")
        return {}
    if args.refiner is not None:
        raise ValueError("--controlnet with --refiner is not supported: the refiner's U-Net "
                         "takes no ControlNet")
    if args.control_image is None:
        raise ValueError("--controlnet needs --control-image")
    return dict(control_image=args.control_image, control_scale=args.control_scale,
                control_start=args.control_start, control_end=args.control_end,
                guess_mode=args.guess_mode)


def _sample_record(args: argparse.Namespace, pipe, strength: float | None, count: int,
                   refiner=None, denoising_end: float | None = None,
                   loras: list[tuple[str, float]] = ()) -> dict:
    """Everything needed to make the same images again, as PNG text metadata."""
    import diffusion_jax

    run = dict(prompt=args.prompt, negative_prompt=args.negative_prompt,
               seeds=[args.seed + i for i in range(count)], sampler=args.sampler,
               steps=args.steps, guidance=args.guidance, guidance_rescale=args.guidance_rescale,
               eta=args.eta, height=args.height or pipe.default_size(),
               width=args.width or pipe.default_size())
    run.update({k: list(v) if isinstance(v, tuple) else v
                for k, v in _family_options(args, "single").items()})
    if strength is not None:
        run.update(strength=strength, init_image=args.init_image)
    if args.mask:
        run["mask"] = args.mask
    run.update(checkpoint=pipe.source.directory, checkpoint_step=pipe.source.step,
               ema=pipe.source.ema, diffusion_jax_version=diffusion_jax.__version__)
    if loras:
        run["loras"] = [{"file": file, "weight": weight} for file, weight in loras]
    if args.vae:
        run["vae"] = args.vae
    if args.controlnet:
        run.update(controlnet=args.controlnet, control_image=args.control_image,
                   control_scale=args.control_scale, control_start=args.control_start,
                   control_end=args.control_end, guess_mode=args.guess_mode)
    if args.dtype != "float32":
        run["dtype"] = args.dtype
    if refiner is not None:
        run.update(refiner=refiner.source.directory, refiner_step=refiner.source.step,
                   denoising_end=denoising_end)
    return run


def run_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from diffusion_jax import pipeline
    from diffusion_jax.convert import lora

    # Everything the user gave is checked before the checkpoint loads.
    out, is_folder = _sample_output(args.out)
    strength = _sample_strength(args)
    if args.columns is not None and args.columns < 1:
        raise ValueError(f"--columns {args.columns}: must be >= 1")
    if args.columns is not None and out.suffix == ".npy" and not is_folder:
        raise ValueError("--columns applies to PNG output only")
    pipeline.validate_options(sampler=args.sampler, steps=args.steps,
                              guidance_rescale=args.guidance_rescale, eta=args.eta,
                              num_images=args.num_images, strength=strength, spell=flag)
    denoising_end = _sample_ensemble(args)
    loras = [lora.parse_flag(spec) for spec in args.lora]  # (file, weight)
    control = _control_options(args)
    import jax.numpy as jnp

    models = dict(use_ema=not args.no_ema, vae=args.vae, dtype=jnp.dtype(args.dtype))
    read = [(lora.read(file), weight) for file, weight in loras]  # bad files fail here
    pipe = pipeline.load(args.checkpoint, step=args.step, loras=read,
                         controlnet=args.controlnet, **models)
    refiner = None if args.refiner is None else pipeline.load(args.refiner, **models)
    options = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                   guidance_rescale=args.guidance_rescale, eta=args.eta, seed=args.seed,
                   num_images=args.num_images, height=args.height, width=args.width,
                   output_type="float32", **control)
    if args.init_latents:
        options["init_latents"] = np.load(args.init_latents, allow_pickle=False)
    if refiner is not None:
        latents = pipe.txt2img(args.prompt, args.negative_prompt, denoising_end=denoising_end,
                               **{**options, "output_type": "latents"},
                               **_family_options(args, "base"))
        options.pop("init_latents", None)  # the base's starting noise
        images = refiner.refine(args.prompt, latents, args.negative_prompt,
                                denoising_start=denoising_end, **options,
                                **_family_options(args, "refiner"))
    elif args.mask:
        images = pipe.inpaint(args.prompt, args.init_image, args.mask, args.negative_prompt,
                              strength=strength, **options, **_family_options(args, "single"))
    elif args.init_image:
        images = pipe.img2img(args.prompt, args.init_image, args.negative_prompt,
                              strength=strength, **options, **_family_options(args, "single"))
    else:
        images = pipe.txt2img(args.prompt, args.negative_prompt, **options,
                              **_family_options(args, "single"))
    if out.suffix == ".npy" and not is_folder:
        with out.open("wb") as f:
            np.save(f, images)
    else:
        _save_pngs(images, out, is_folder, _sample_record(
            args, pipe, strength, len(images), refiner, denoising_end, loras), args.columns)
    print(f"wrote {len(images)} image(s) to {out}")


def _save_pngs(images, out, is_folder: bool, run: dict, columns: int | None) -> None:
    """The grid at `out`, or in folder `out` one PNG per image (its own seed in its
    metadata) and the grid as grid.png."""
    from diffusion_jax import image_files

    grid = out
    if is_folder:
        out.mkdir(exist_ok=True)
        for i, (image, seed) in enumerate(zip(images, run["seeds"])):
            image_files.save_png(image, out / f"{i:05d}-{seed}.png",
                                 image_files.png_metadata(run, [seed]))
        grid = out / "grid.png"
    image_files.save_grid(images, grid, image_files.png_metadata(run, run["seeds"]),
                          columns=columns)

"""The `diffusion-jax` command: one subcommand per job, each a thin call into the library.

A subcommand is a function `add_<name>(subparsers)` that declares its arguments and sets
`run=<function taking the parsed args>`; add one to SUBCOMMANDS to grow the command.
Errors in what the user gave (paths, files, configs) print one line to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Sequence

PROG = "diffusion-jax"


def load_config_file(path: str | os.PathLike) -> Any:
    """`get_config()` of a configs/*.py file, loaded by path. The directory holding the file's
    folder (the repository root for configs/X.py) goes on sys.path, as configs import each
    other (`from configs import sd15`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_diffusion_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    return module.get_config()


def _config_sections(path: str | None) -> dict | None:
    if path is None:
        return None
    config = load_config_file(path)
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


# ----------------------------------------------------------------------------- convert


def add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="import diffusers or single-file weights as a diffusion_jax checkpoint",
        description="Read Stable Diffusion 1.x / 2.x weights and write them as a new "
                    "diffusion_jax checkpoint directory (step 0). Everything is read and "
                    "checked in memory first; OUT appears complete or not at all.",
        epilog="single-file defaults: the architecture (SD 1.x or 2.x, in/out channels, "
               "widths, depths) is read from the weights. What weights cannot say is taken "
               "from the released model of that family: SD 1.x -> configs/sd15.py (epsilon "
               "prediction); SD 2.x -> configs/sd21.py (768px, v-prediction, upcast "
               "attention). For SD 2.x-base pass --config configs/sd21_base.py; any section "
               "of --config (unet, vae, text_encoder, schedule, tokenizer) replaces the "
               "default and is checked against the weights.")
    parser.add_argument("--from", dest="source_format", required=True,
                        choices=("diffusers", "single-file"),
                        help="diffusers: a pipeline folder (unet/, vae/, text_encoder/, ...); "
                             "single-file: a CompVis / A1111 .safetensors or .ckpt file")
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


def add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a diffusers folder (for PyTorch users)",
        description="Write the models of a diffusion_jax checkpoint as a diffusers "
                    "StableDiffusionPipeline folder: unet/, vae/, text_encoder/ (safetensors), "
                    "scheduler/, tokenizer/, model_index.json.")
    parser.add_argument("--checkpoint", required=True, help="diffusion_jax checkpoint directory")
    parser.add_argument("--to", default="diffusers", choices=("diffusers",),
                        help="output format (default: diffusers)")
    parser.add_argument("--out", required=True,
                        help="new output directory (must not exist, or be empty)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA params (unet_ema, ...) instead of the raw ones")
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from diffusion_jax import convert

    convert.export(args.checkpoint, args.out, to=args.to, step=args.step, use_ema=args.ema)
    print(f"wrote {args.to} folder {args.out}")


# ----------------------------------------------------------------------------- params


def add_params(subparsers) -> None:
    parser = subparsers.add_parser(
        "params", help="print each model's parameter count for a config",
        description="Print the parameter count of the U-Net, the VAE and the text encoder a "
                    "config describes (shapes only: nothing is initialised).")
    parser.add_argument("--config", required=True, help="configs/*.py file")
    parser.set_defaults(run=run_params)


def run_params(args: argparse.Namespace) -> None:
    from diffusion_jax.models import COMPONENTS, count_params

    sections = _config_sections(args.config)
    counts = {}
    for name, component in COMPONENTS.items():
        if name in sections:
            counts[name] = count_params(component.param_shapes(component.config_from_dict(sections[name])))
    if not counts:
        raise ValueError(f"config {args.config} has none of the sections {list(COMPONENTS)}")
    width = max(map(len, counts)) + 2
    for name, count in counts.items():
        print(f"{name:<{width}}{count:>15,}")
    print(f"{'total':<{width}}{sum(counts.values()):>15,}")


# ----------------------------------------------------------------------------- sample


def add_sample(subparsers) -> None:
    from diffusion_jax.pipeline import SAMPLER_NAMES

    parser = subparsers.add_parser(
        "sample", help="generate images from a checkpoint (txt2img, img2img, inpaint)",
        description="Generate images with a diffusion_jax checkpoint. With --init-image it "
                    "is img2img (--strength: 0 keeps the image, 1 replaces it); add --mask "
                    "to inpaint (white = repaint). Image i uses seed SEED + i. The whole run "
                    "(text encoder, sampling loop, VAE decode) is one compiled program, cached "
                    "on disk (DIFFUSION_JAX_CACHE_DIR) so a second run starts fast.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("--sampler", default="dpmpp_2m", metavar="NAME",
                        help=f"one of: {', '.join(SAMPLER_NAMES)} (default: dpmpp_2m)")
    parser.add_argument("--steps", type=int, default=25, help="inference steps (default: 25)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance scale; 1 disables it (default: 7.5)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="guidance rescale (Lin et al. 2023), 0..1 (default: 0)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images to make (default: 1)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--init-image", help="img2img / inpaint starting image")
    parser.add_argument("--strength", type=float,
                        help="img2img / inpaint noise strength (default: 0.8 img2img, 1 inpaint)")
    parser.add_argument("--mask", help="inpainting mask image, white = repaint")
    parser.add_argument("--init-latents", metavar="FILE.npy",
                        help="starting noise [N, C, H/f, W/f] (diffusers layout), to replay a "
                             "run of another implementation exactly")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="use raw, not EMA, U-Net weights")
    parser.add_argument("--out", required=True,
                        help="FILE.png (a grid, run settings in its text metadata) or FILE.npy "
                             "(float32 [N, H, W, 3] in [0, 1])")
    parser.set_defaults(run=run_sample)


def run_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from diffusion_jax import pipeline

    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        raise ValueError(f"--out {out}: the output must end in .png or .npy")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image: the image to inpaint")
    pipeline.parse_sampler(args.sampler)  # fail on a bad name before loading anything
    pipe = pipeline.load(args.checkpoint, step=args.step, use_ema=not args.no_ema)
    options = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                   guidance_rescale=args.guidance_rescale, eta=args.eta, seed=args.seed,
                   num_images=args.num_images, height=args.height, width=args.width,
                   output_type="float32")
    if args.init_latents:
        options["init_latents"] = np.load(args.init_latents, allow_pickle=False)
    if args.mask:
        strength = 1.0 if args.strength is None else args.strength
        images = pipe.inpaint(args.prompt, args.init_image, args.mask, args.negative_prompt,
                              strength=strength, **options)
    elif args.init_image:
        strength = 0.8 if args.strength is None else args.strength
        images = pipe.img2img(args.prompt, args.init_image, args.negative_prompt,
                              strength=strength, **options)
    else:
        if args.strength is not None:
            raise ValueError("--strength needs --init-image")
        strength = None
        images = pipe.txt2img(args.prompt, args.negative_prompt, **options)
    if out.suffix == ".npy":
        np.save(out, images)
    else:
        metadata = dict(prompt=args.prompt, negative_prompt=args.negative_prompt,
                        seeds=[args.seed + i for i in range(len(images))], sampler=args.sampler,
                        steps=args.steps, guidance=args.guidance, checkpoint=str(args.checkpoint))
        if strength is not None:
            metadata["strength"] = strength
        pipeline.save_grid(images, out, metadata)
    print(f"wrote {len(images)} image(s) to {out}")


# ----------------------------------------------------------------------------- bench


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure speed against diffusers PyTorch on the same weights",
        description="Benchmarks on random weights built from a config. `sample`: txt2img "
                    "seconds per image (median after a warm-up), compile time and compile "
                    "count; with --compare torch, the same run through diffusers' "
                    "StableDiffusionPipeline (same weights, latents, sampler, steps) and the "
                    "ratio (above 1: we are faster). Needs the [test] extra for --compare.")
    parser.add_argument("what", choices=["sample"], help="what to measure")
    parser.add_argument("--config", default=None,
                        help="configs/*.py file describing the models (default: configs/tiny.py)")
    parser.add_argument("--sampler", default="dpmpp_2m", help="sampler (default: dpmpp_2m)")
    parser.add_argument("--steps", type=int, default=20, help="inference steps (default: 20)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (default: 3)")
    parser.add_argument("--compare", choices=["torch"], help="also run the PyTorch reference")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    from diffusion_jax import bench

    path = args.config or Path(__file__).resolve().parent.parent / "configs" / "tiny.py"
    config = _config_sections(str(path))
    result = bench.bench_sample(config, sampler=args.sampler, steps=args.steps,
                                batch=args.batch, repeats=args.repeats,
                                compare_torch=args.compare == "torch")
    bench.print_result(result, args.json)


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = (add_convert, add_export, add_params, add_sample, add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Latent diffusion (Stable Diffusion 1.x / 2.x) in JAX/Flax.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:  # bad input: files, configs, weights
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

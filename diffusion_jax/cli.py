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


# ----------------------------------------------------------------------------- main

SUBCOMMANDS = (add_convert, add_export, add_params)


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

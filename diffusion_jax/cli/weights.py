"""`convert`, `export` and `params`: weights in and out of diffusion_jax checkpoints."""

from __future__ import annotations

import argparse

from diffusion_jax.cli.common import CHECKPOINT_HELP, config_sections


# ----------------------------------------------------------------------------- convert

def add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="import diffusers or single-file weights as a diffusion_jax checkpoint",
        description="Read Stable Diffusion 1.x / 2.x, SDXL, SD3 / SD3.5 or Flux.1 "
                    "weights and write them as a new diffusion_jax checkpoint directory "
                    "(step 0). Everything is read and "
                    "checked in memory first; OUT appears complete or not at all.",
        epilog="single-file defaults: the architecture (SD 1.x, 2.x, SDXL base or refiner, "
               "in/out channels, widths, depths) is read from the weights. What weights cannot "
               "say is taken from the released model of that family: SD 1.x -> configs/sd15.py "
               "(epsilon prediction); SD 2.x -> configs/sd21.py (768px, v-prediction, upcast "
               "attention); SDXL -> configs/sdxl_base.py or sdxl_refiner.py. For SD 2.x-base "
               "pass --config configs/sd21_base.py; any section of --config (unet, vae, "
               "text_encoder, schedule, tokenizer, ...) replaces the default and is checked "
               "against the weights. A Flux.1 (BFL) or SD3 / SD3.5 (Stability) single file "
               "needs --base, a diffusers folder of its family: the towers the file lacks, "
               "the tokenizers and the scheduler come from there; the transformer's "
               "architecture from the weights.")
    parser.add_argument("--from", dest="source_format", required=True,
                        choices=("diffusers", "single-file"),
                        help="diffusers: a pipeline folder (unet/, vae/, text_encoder/, ...) "
                             "or a ControlNetModel folder; single-file: a CompVis / SGM "
                             "(A1111, ComfyUI) .safetensors or .ckpt file, a Flux.1 / SD3 "
                             "file (flux1-dev.safetensors, sd3.5_large.safetensors, with "
                             "--base), or an original ControlNet file (control_*.pth / "
                             ".safetensors)")
    parser.add_argument("src", help="the diffusers folder or the single weights file")
    parser.add_argument("--out", required=True,
                        help="new checkpoint directory (must not exist, or be empty)")
    parser.add_argument("--config", help="configs/*.py file describing a single file's model "
                                         "(see below); single-file only")
    parser.add_argument("--ema", action="store_true",
                        help="single-file only: take the EMA U-Net weights (model_ema.*)")
    parser.add_argument("--base", metavar="DIR",
                        help="Flux.1 / SD3 single files: a diffusers folder of the same family "
                             "(e.g. FLUX.1-dev) that completes the file's system")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from diffusion_jax import convert

    convert.convert(args.source_format, args.src, args.out,
                    config=config_sections(args.config), use_ema=args.ema, base=args.base)
    print(f"wrote checkpoint {args.out}")


# ----------------------------------------------------------------------------- export

def add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a diffusers folder, or a LoRA run's adapter "
                       "as a PEFT / kohya file (for PyTorch users)",
        description="Write the models of a diffusion_jax checkpoint as a diffusers "
                    "StableDiffusionPipeline folder: unet/, vae/, text_encoder/ (safetensors), "
                    "scheduler/, tokenizer/, model_index.json; or, with --to peft|kohya, the "
                    "LoRA factors of a LoRA run alone as one .safetensors file (diffusers' "
                    "load_lora_weights, A1111 and ComfyUI read it; the fused model is "
                    "--to diffusers).")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--to", default="diffusers", choices=("diffusers", "peft", "kohya"),
                        help="output format (default: diffusers)")
    parser.add_argument("--out", required=True,
                        help="new output directory (must not exist, or be empty); peft / "
                             "kohya: the .safetensors file")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true",
                        help="export the raw params; default: the EMA params (unet_ema, ...) "
                             "where the checkpoint has them, as `sample` uses")
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from diffusion_jax import convert

    convert.export(args.checkpoint, args.out, to=args.to, step=args.step,
                   use_ema=not args.no_ema)
    print(f"wrote {args.to} {'LoRA file' if args.to in ('peft', 'kohya') else 'folder'} "
          f"{args.out}")


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

    sections = config_sections(args.config)
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

"""`bench`: speed against PyTorch and compiled memory of training configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_jax.cli.common import config_sections, fake_cpu_devices


# Options that only some benchmarks take; the others reject them rather than ignore them.
BENCH_ONLY_OPTIONS = {"remat": ("train",), "context": ("train",), "lora": ("train",),
                      "compare": ("unet", "train", "vae", "transformer", "sample"),
                      "sampler": ("sample", "compile"), "steps": ("sample", "compile"),
                      "batch": ("unet", "train", "vae", "transformer", "sample", "compile"),
                      "dtype": ("unet", "train", "vae", "transformer", "sample", "compile"),
                      "repeats": ("unet", "train", "vae", "transformer", "sample", "compile"),
                      "blocks": ("unet", "train", "vae", "transformer", "sample"),
                      "devices": ("memory",)}


def add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure speed against diffusers PyTorch on the same weights",
        description="Benchmarks on random weights built from a config: `unet` (forward), "
                    "`train` (one AdamW step), `vae` (encode + decode), `transformer` "
                    "(Flux.1's or SD3's flow transformer forward), `sample` (txt2img "
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
                        help="batch size (default: unet 8, train 8, vae 4, transformer 2, sample 1, "
                             "compile 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="compute dtype; params stay float32 (default: float32)")
    parser.add_argument("--remat", help="train: jax.checkpoint_policies policy for each U-Net "
                                        "block, e.g. nothing_saveable (default: no remat)")
    parser.add_argument("--context", choices=["precomputed", "encoded"],
                        help="train: the text context in the batch, as precomputed embeddings "
                             "give it, or encoded from token ids by the frozen text towers in "
                             "every step (default: precomputed)")
    parser.add_argument("--lora", type=int, metavar="RANK",
                        help="train: train rank-RANK LoRA factors of the U-Net's attention "
                             "alone, its base frozen (the reference: diffusers + PEFT)")
    parser.add_argument("--sampler", help="sample, compile: sampler (default: dpmpp_2m)")
    parser.add_argument("--steps", type=int,
                        help="sample, compile: inference steps (default: sample 20, compile 4)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs after the warm-up (default: 5; sample and compile 3)")
    parser.add_argument("--compare", choices=["torch"], help="also run the PyTorch reference")
    parser.add_argument("--blocks", type=int, metavar="N",
                        help="with --compare torch: N fresh processes one after another, each "
                             "timing ours then PyTorch's; prints the median ratio over blocks "
                             "and its min and max (default: one run in this process)")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="memory: compile for N fake CPU devices standing in for N chips "
                             "(default: 8)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> None:
    for option, applies in BENCH_ONLY_OPTIONS.items():
        if getattr(args, option) is not None and args.what not in applies:
            raise ValueError(f"--{option} applies to bench {', '.join(applies)} only")
    for option in ("batch", "steps", "repeats", "blocks"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ValueError(f"--{option} must be at least 1")
    if args.blocks is not None and not args.compare:
        raise ValueError("--blocks alternates ours and PyTorch's runs: add --compare torch")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
    from diffusion_jax import bench

    if args.what in bench.TRAINING_CONFIG_BENCHMARKS:
        bench.print_result(bench.run(args.what, _training_config(args)), args.json)
        return
    config = config_sections(args.config)

    options = {name: getattr(args, name) for name in ("batch", "dtype", "remat", "context",
                                                      "lora", "sampler", "steps", "repeats")
               if getattr(args, name) is not None}
    if args.blocks is not None:
        from diffusion_jax.bench import blocks

        child = [args.what, "--config", args.config, "--compare", "torch",
                 *(f"--{name}={value}" for name, value in options.items())]
        bench.print_result(blocks.run_blocks(child, args.blocks), args.json)
        return
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
    fake_cpu_devices(devices)
    config = config_files.load(args.config)
    apply_overrides(config, args.config_overrides)
    return config

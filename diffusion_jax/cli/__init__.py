"""The `diffusion-jax` command: one subcommand per job, each a thin call into the library.

A subcommand is a function `add_<name>(subparsers)` in this package's module for its job
(weights, sample, bench, train, fid, clip_score) that declares its arguments and sets
`run=<function taking the parsed args>`; add one to SUBCOMMANDS to grow the command.
Errors in what the user gave (paths, files, configs) print one line to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from diffusion_jax.cli import bench, clip_score, fid, sample, train, weights
from diffusion_jax.cli.bench import BENCH_ONLY_OPTIONS  # noqa: F401  (tests read it here)
from diffusion_jax.cli.common import PROG


SUBCOMMANDS = (weights.add_convert, weights.add_export, weights.add_params, sample.add_sample,
               bench.add_bench, train.add_train, fid.add_fid, clip_score.add_clip_score,
               train.add_precompute)


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
    if overrides and args.run not in (train.run_train, train.run_precompute) and not (
            args.run is bench.run_bench and args.what == "memory"):
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



"""`train` and `precompute`: training runs from a config, and their frozen-tower latents."""

from __future__ import annotations

import argparse
import sys

from diffusion_jax.cli.common import PROG, fake_cpu_devices


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
        fake_cpu_devices(args.devices)
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

"""`clip-score`: torchmetrics' CLIP score of captioned images or a checkpoint's samples, with
a transformers CLIPModel folder the user has."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_jax.cli.common import (CHECKPOINT_HELP, generation_share, read_prompts,
                                      with_progress)
from diffusion_jax.cli.sample import add_sampler_args, flag


def add_clip_score(subparsers) -> None:
    parser = subparsers.add_parser(
        "clip-score", help="CLIP score of captioned images or of a checkpoint's samples",
        description="torchmetrics' CLIPScore with a CLIP model run in JAX: 100 * the cosine "
                    "of each image's and its caption's CLIP features, averaged, clamped at 0. "
                    "Images are resized, cropped and normalised as the CLIP folder's "
                    "preprocessor_config.json says (transformers' CLIPImageProcessor). Prints "
                    "`CLIP score X (N images)`.",
        epilog="e.g. `diffusion-jax clip-score --clip clip-vit-large-patch14 --images samples/` "
               "or `... --checkpoint ckpt/sd15 --prompts prompts.txt`; the CLIP folder is one "
               "you have (save_pretrained / a hub snapshot); nothing is downloaded.")
    parser.add_argument("--clip", required=True, metavar="DIR",
                        help="a transformers CLIPModel folder: config.json, model.safetensors "
                             "(or pytorch_model.bin), the tokenizer files, "
                             "preprocessor_config.json")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", metavar="DIR",
                      help="images (searched recursively) with captions in captions.jsonl "
                           "({\"file\": ..., \"caption\": ...}), captions.csv (file,caption) or "
                           "NAME.txt beside NAME.png: the training folder source's formats")
    what.add_argument("--checkpoint", help="generate one image per --prompts line and score "
                                           "it against its prompt: " + CHECKPOINT_HELP)
    parser.add_argument("--prompts", metavar="FILE",
                        help="with --checkpoint: one prompt per line; image i is generated "
                             "from line i with seed SEED + i")
    add_sampler_args(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of image 0; image i uses seed + i (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per generation call and per CLIP batch (default: 16)")
    parser.set_defaults(run=run_clip_score)


def _pairs(args: argparse.Namespace):
    """The (image, caption) batches to score and their count, checked before anything
    expensive is loaded."""
    from diffusion_jax import pipeline
    from diffusion_jax.eval import clip_score

    if args.images:
        if args.prompts:
            raise ValueError("--prompts goes with --checkpoint; with --images the captions come "
                             "from the folder")
        source = clip_score.check_image_folder(args.images)
        return clip_score.folder_batches(source, args.batch_size), len(source), f"read {args.images}"
    if not args.prompts:
        raise ValueError("--checkpoint needs --prompts FILE (one prompt per line, an image each)")
    prompts = read_prompts(args.prompts)
    pipeline.validate_options(sampler=args.sampler, steps=args.steps, spell=flag)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    batches = clip_score.generated_pairs(args.checkpoint, prompts, batch_size=args.batch_size,
                                         seed=args.seed, sampler=args.sampler, steps=args.steps,
                                         guidance=args.guidance)
    return batches, len(prompts), "generated"


def run_clip_score(args: argparse.Namespace) -> None:
    import sys

    from diffusion_jax.eval import clip_score

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    folder = clip_score.check_clip_folder(args.clip)
    if args.checkpoint:  # generation runs on every process of a jax.distributed job
        from diffusion_jax import parallel

        parallel.initialize_distributed()
    batches, total, label = _pairs(args)
    scorer = clip_score.load_clip(folder, batch_size=args.batch_size)
    if args.checkpoint:
        import jax

        label, mine = generation_share(total, args.batch_size)
        result = clip_score.generated_clip_score(with_progress(batches, mine, label), scorer,
                                                 total, args.batch_size)
        if jax.process_index() != 0:  # every process holds the same score; one reports
            return
    else:
        result = clip_score.clip_score(with_progress(batches, total, label), scorer)
    if result.negative:
        print(f"{result.negative} of {result.count} pairs have a negative cosine (the mean "
              f"is {result.mean:.4f} before the clamp at 0)", file=sys.stderr)
    print(f"CLIP score {result.score:.4f} ({result.count} images)")

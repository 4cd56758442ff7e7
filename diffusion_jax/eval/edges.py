"""Edge agreement: how closely samples follow a ControlNet's edge map.

The samples' edges are OpenCV's Canny (as the condition images were made, see
data/conditions.py); agreement is the F1 of edge pixels matched within `tolerance` pixels
(the boundary F-measure of contour benchmarks, with a square neighbourhood):
precision = the sample's edge pixels near a control edge, recall = the control's edge
pixels near a sample edge. Both on the same prompts and seeds with and without the ControlNet
say how much the ControlNet steers.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffusion_jax.data.conditions import canny_edges


def _near(edges: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within `tolerance` (Chebyshev distance) of an edge pixel."""
    if tolerance == 0:
        return edges
    size = 2 * tolerance + 1
    return ndimage.binary_dilation(edges, structure=np.ones((size, size), bool))


def edge_f1(control: np.ndarray, sample: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two boolean edge maps [H, W]. Two empty maps agree (1.0); an empty one against a
    non-empty one scores 0."""
    control, sample = np.asarray(control, bool), np.asarray(sample, bool)
    if control.shape != sample.shape or control.ndim != 2:
        raise ValueError(f"edge maps must be two [H, W] arrays of one shape, got "
                         f"{control.shape} and {sample.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0 pixels")
    if not control.any() and not sample.any():
        return 1.0
    if not control.any() or not sample.any():
        return 0.0
    precision = float(np.mean(_near(control, tolerance)[sample]))
    recall = float(np.mean(_near(sample, tolerance)[control]))
    total = precision + recall
    return 0.0 if total == 0 else 2 * precision * recall / total


def edge_agreement(control_images: np.ndarray, samples: np.ndarray, *, low: int = 100,
                   high: int = 200, tolerance: int = 1) -> float:
    """Mean edge F1 between control edge images [N, H, W, 3] in [0, 1] (an edge: > 0.5) and
    samples [N, H, W, 3] in [0, 1], whose edges are Canny(low, high) of their uint8 RGB."""
    control_images, samples = np.asarray(control_images), np.asarray(samples)
    if control_images.shape != samples.shape:
        raise ValueError(f"control images {control_images.shape} and samples {samples.shape} "
                         "must have one shape [N, H, W, 3]")
    scores = []
    for control, sample in zip(control_images, samples):
        pixels = np.round(np.clip(sample, 0.0, 1.0) * 255).astype(np.uint8)
        scores.append(edge_f1(control[..., 0] > 0.5, canny_edges(pixels, low, high)[..., 0] > 0,
                              tolerance))
    return float(np.mean(scores))


def with_and_without_controlnet(base: str, controlnet: str, control_images: np.ndarray,
                                prompts: list[str], *, seed: int = 0, low: int = 100,
                                high: int = 200, tolerance: int = 1, **sampling) -> dict:
    """{"edge_f1_base", "edge_f1_controlnet"}: the edge agreement of samples of checkpoint
    `base` without and with the ControlNet checkpoint `controlnet`, on the same prompts and
    seeds (row i: prompts[i] under control_images[i], seed + i). `sampling`: txt2img's
    options (sampler, steps, guidance, ...)."""
    from diffusion_jax import pipeline

    control_images = np.asarray(control_images, np.float32)
    if len(prompts) != len(control_images):
        raise ValueError(f"{len(prompts)} prompts for {len(control_images)} control images: "
                         "give one prompt per image")
    height, width = control_images.shape[1:3]
    pipes = {"base": pipeline.load(base), "controlnet": pipeline.load(base, controlnet=controlnet)}
    results = {}
    for name, pipe in pipes.items():
        samples = [pipe.txt2img(prompt, seed=seed + i, height=height, width=width,
                                output_type="float32", **sampling,
                                **({"control_image": image} if name == "controlnet" else {}))
                   for i, (prompt, image) in enumerate(zip(prompts, control_images))]
        results[f"edge_f1_{name}"] = edge_agreement(control_images, np.concatenate(samples),
                                                    low=low, high=high, tolerance=tolerance)
    return results


def held_out_edges(config, count: int) -> tuple[np.ndarray, list[str]]:
    """(the Canny condition images, the captions) of the first `count` held-out examples of
    a ControlNet training config's data (the demo's: Fashion-MNIST test images)."""
    from diffusion_jax import system
    from diffusion_jax.data import fashion_mnist, input_pipeline
    from diffusion_jax.training import trainer

    text = system.text_inputs(system.from_config(config), trainer.model_config(config))
    batch = input_pipeline.make_eval_batches(config.data, text, num_examples=count,
                                             batch_size=count)[0]
    captions = [fashion_mnist.caption(label) if label >= 0 else ""
                for label in batch["label"]]
    return batch["condition"], captions


def main(argv: list[str] | None = None) -> dict:
    """`python -m diffusion_jax.eval.edges`: the ControlNet demo's figure, edge F1 of samples
    with and without the ControlNet on held-out condition images and their captions."""
    import argparse
    import json

    from diffusion_jax import config_files

    parser = argparse.ArgumentParser(prog="python -m diffusion_jax.eval.edges",
                                     description=main.__doc__)
    parser.add_argument("--config", default="controlnet_demo",
                        help="the ControlNet's training config (its data gives the edges)")
    parser.add_argument("--base", required=True, help="the base model's checkpoint")
    parser.add_argument("--controlnet", required=True, help="the ControlNet checkpoint "
                        "(WORKDIR/controlnet of its run)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    config = config_files.load(args.config)
    images, captions = held_out_edges(config, args.examples)
    data = config.data
    results = with_and_without_controlnet(
        args.base, args.controlnet, images, captions, low=data.canny_low, high=data.canny_high,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    print(json.dumps({"examples": len(images), **results}))
    return results


if __name__ == "__main__":
    main()

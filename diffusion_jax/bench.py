"""Benchmarks that print figures: ours against diffusers PyTorch on the same weights.

`sample`: txt2img seconds per image on a random-weight system built from a config (default
configs/tiny.py), our compiled pipeline against diffusers' `StableDiffusionPipeline` with the
same weights, starting latents, sampler and steps, in one process. Reports the median over
repeats after a warm-up, the first call's compile time and the number of compilations.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler"}


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _random_system(config: Mapping[str, Any], directory: Path) -> Path:
    """A converted checkpoint of random weights, initialised by our own init functions."""
    import jax

    from diffusion_jax import checkpoint
    from diffusion_jax.models import COMPONENTS

    params = {}
    for i, name in enumerate(("unet", "vae", "text_encoder")):
        component = COMPONENTS[name]
        params[name] = component.init_params(component.config_from_dict(config[name]),
                                             jax.random.key(i))
    out = directory / "ckpt"
    checkpoint.create(out, params, config)
    return out


def bench_sample(config: Mapping[str, Any], *, sampler: str = "dpmpp_2m", steps: int = 20,
                 batch: int = 1, repeats: int = 3, compare_torch: bool = False) -> dict:
    from diffusion_jax import pipeline

    if compare_torch and sampler not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"--compare torch supports samplers {sorted(DIFFUSERS_SCHEDULERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_system(config, Path(tmp))
        pipe = pipeline.load(ckpt, cache_dir=None)
        size = pipe.default_size()
        rng = np.random.default_rng(0)
        latents = rng.standard_normal(
            (batch, pipe.latent_channels, size // pipe.vae_factor, size // pipe.vae_factor)).astype(np.float32)
        prompts = ["a photo of a cat"] * batch
        run = lambda: pipe.txt2img(prompts, "blurry", sampler=sampler, steps=steps,
                                   init_latents=latents, output_type="float32")
        start = time.perf_counter()
        ours_images = run()
        first_call = time.perf_counter() - start
        ours = statistics.median(_timed(run, repeats))
        result = dict(benchmark="sample", sampler=sampler, steps=steps, batch=batch,
                      size=size, compile_and_first_run_s=round(first_call, 3),
                      compilations=pipe.num_compilations,
                      seconds_per_image=ours / batch)
        if compare_torch:
            result.update(_torch_sample(ckpt, Path(tmp), prompts, latents, sampler, steps,
                                        repeats, ours_images))
            result["ratio_vs_torch"] = result["torch_seconds_per_image"] / result["seconds_per_image"]
    return result


def _torch_sample(ckpt, tmp, prompts, latents, sampler, steps, repeats, ours_images) -> dict:
    import diffusers
    import torch

    from diffusion_jax import convert

    convert.export(ckpt, tmp / "diffusers", to="diffusers")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp / "diffusers", safety_checker=None, requires_safety_checker=False,
        local_files_only=True)
    scheduler_class = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler])
    options = {"clip_sample": False} if sampler == "ddim" else {}
    if sampler == "pndm":
        options["skip_prk_steps"] = True
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **options)
    reference.set_progress_bar_config(disable=True)
    run = lambda: reference(prompts, negative_prompt=["blurry"] * len(prompts),
                            num_inference_steps=steps, latents=torch.from_numpy(latents),
                            output_type="np").images
    with torch.inference_mode():
        torch_images = run()
        seconds = statistics.median(_timed(run, repeats))
    return dict(torch_seconds_per_image=seconds / len(prompts),
                torch_threads=torch.get_num_threads(),
                max_pixel_difference=float(np.abs(torch_images - ours_images).max()))


def print_result(result: Mapping[str, Any], json_path: str | None = None) -> None:
    width = max(map(len, result)) + 2
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}{shown}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")

"""Sampling benchmarks on a random-weight checkpoint built from a config.

`sample`: txt2img seconds per image, our compiled pipeline against diffusers' pipeline (SD's
or SDXL's) with the same weights, starting latents, sampler and steps, in one process. Reports the median over repeats after a warm-up, the first call's compile time and
the number of compilations.

`compile`: the persistent compilation cache. The same txt2img job runs in two fresh processes
sharing one empty cache directory; each measures its first call minus a warm call (the
compile, or in the second process the cache load) and counts its traces and cache hits.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffusion_jax import program_cache
from diffusion_jax.bench import measure
from diffusion_jax.bench.weights import random_params

DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler"}
PROMPT, NEGATIVE_PROMPT = "a photo of a cat", "blurry"
GUIDANCE = 7.5  # given to both: diffusers' SDXL pipeline defaults to 5, SD's to 7.5


def _random_system(config: Mapping[str, Any], directory: Path) -> Path:
    """A converted checkpoint of random weights (`weights.random_params`)."""
    from diffusion_jax import checkpoint, system

    params = {tower.name: random_params(tower.kind, config[tower.name], seed)
              for seed, tower in enumerate(system.from_config(config).towers)}
    out = directory / "ckpt"
    checkpoint.create(out, params, config)
    return out


def _starting_latents(pipe, batch: int) -> np.ndarray:
    """Fixed starting noise in the diffusers layout, so both implementations start alike."""
    side = pipe.default_size() // pipe.vae_factor
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, pipe.latent_channels, side, side)).astype(np.float32)


def bench_sample(config: Mapping[str, Any], *, sampler: str = "dpmpp_2m", steps: int = 20,
                 batch: int = 1, dtype: str = "float32", repeats: int = 3,
                 compare_torch: bool = False) -> dict:
    from diffusion_jax import pipeline

    if compare_torch and sampler not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"--compare torch supports samplers {sorted(DIFFUSERS_SCHEDULERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_system(config, Path(tmp))
        pipe = pipeline.load(ckpt, cache_dir=None, dtype=measure.DTYPES[dtype])
        latents = _starting_latents(pipe, batch)
        prompts = [PROMPT] * batch
        run = lambda: pipe.txt2img(prompts, NEGATIVE_PROMPT, sampler=sampler, steps=steps,
                                   guidance=GUIDANCE, init_latents=latents,
                                   output_type="float32")
        start = time.perf_counter()
        ours_images = run()
        first_call = time.perf_counter() - start
        ours = statistics.median(measure.timed(run, repeats))
        result = dict(benchmark="sample", sampler=sampler, steps=steps, batch=batch,
                      dtype=dtype, size=pipe.default_size(),
                      compile_and_first_run_s=round(first_call, 3),
                      compilations=pipe.num_compilations,
                      seconds_per_image=ours / batch,
                      **measure.compile_options_shown("forward"), **measure.peak_memory(),
                      **measure.environment())
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
    # The pipeline class the exported model_index.json names (SD's or SDXL's).
    index = json.loads((tmp / "diffusers" / "model_index.json").read_text())
    extra = ({"safety_checker": None, "requires_safety_checker": False}
             if "safety_checker" in index else {})
    reference = diffusers.DiffusionPipeline.from_pretrained(
        tmp / "diffusers", local_files_only=True, **extra)
    scheduler_class = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler])
    options = {"clip_sample": False} if sampler == "ddim" else {}
    if sampler == "pndm":
        options["skip_prk_steps"] = True
    reference.scheduler = scheduler_class.from_config(reference.scheduler.config, **options)
    reference.set_progress_bar_config(disable=True)
    run = lambda: reference(prompts, negative_prompt=[NEGATIVE_PROMPT] * len(prompts),
                            num_inference_steps=steps, guidance_scale=GUIDANCE,
                            latents=torch.from_numpy(latents),
                            output_type="np").images
    with torch.inference_mode():
        torch_images = run()
        seconds = statistics.median(measure.timed(run, repeats))
    return dict(torch_seconds_per_image=seconds / len(prompts),
                torch_threads=torch.get_num_threads(),
                max_pixel_difference=float(np.abs(torch_images - ours_images).max()))


# ----------------------------------------------------------------------------- compile

CACHE_EVENTS = {"cache_hits": "/jax/compilation_cache/cache_hits",
                "cache_misses": "/jax/compilation_cache/cache_misses"}
# Where the first call's compile time goes (every jitted function in it: the sampling
# program and the small eager ops around it): Python tracing and lowering to StableHLO, which
# the exported-program cache (`program_cache`) skips in a later process, and the backend
# compile, which the persistent cache replaces (its figure includes the cache read on a hit).
PHASE_EVENTS = {"trace_s": "/jax/core/compile/jaxpr_trace_duration",
                "lower_s": "/jax/core/compile/jaxpr_to_mlir_module_duration",
                "backend_compile_s": "/jax/core/compile/backend_compile_duration"}


def bench_compile(config: Mapping[str, Any], *, sampler: str = "dpmpp_2m", steps: int = 4,
                  batch: int = 1, dtype: str = "float32", repeats: int = 3) -> dict:
    """First- vs second-process compile time of one txt2img job with the persistent cache
    (issue 6 target: the second at most 25% of the first)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _random_system(config, Path(tmp))
        cache = Path(tmp) / "xla_cache"
        job = [str(ckpt), sampler, str(steps), str(batch), dtype, str(repeats)]
        first, second = (_run_child(job, cache) for _ in range(2))
        entries = sum(1 for p in cache.iterdir() if p.name != program_cache.SUBDIRECTORY
                      ) if cache.is_dir() else 0
        programs = len(list((cache / program_cache.SUBDIRECTORY).glob("*" + program_cache.SUFFIX)))
    result = dict(benchmark="compile", sampler=sampler, steps=steps, batch=batch, dtype=dtype,
                  repeats=repeats, size=first.pop("size"), cache_entries=entries,
                  exported_programs=programs)
    second.pop("size")
    for name, child in (("first", first), ("second", second)):
        result.update({f"{name}_process_{key}": value for key, value in child.items()})
    result["second_over_first_compile"] = (result["second_process_compile_s"]
                                           / result["first_process_compile_s"])
    result.update(measure.environment())
    return result


def _run_child(job: list[str], cache: Path) -> dict:
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, DIFFUSION_JAX_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")])))
    code = "from diffusion_jax.bench import sampling; sampling.compile_child()"
    done = subprocess.run([sys.executable, "-c", code, *job], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the compile benchmark's child process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_child() -> None:
    """A fresh process's txt2img job (argv: checkpoint, sampler, steps, batch, dtype,
    repeats); prints one JSON line. The cache directory comes from DIFFUSION_JAX_CACHE_DIR."""
    import jax

    from diffusion_jax import pipeline

    ckpt, sampler, steps, batch, dtype, repeats = sys.argv[1:]
    steps, batch, repeats = int(steps), int(batch), int(repeats)
    events, phases = collections.Counter(), collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))

    recording = [False]

    def record_phase(event, seconds, **_):
        if recording[0]:
            phases[event] += seconds

    jax.monitoring.register_event_duration_secs_listener(record_phase)
    pipe = pipeline.load(ckpt, dtype=measure.DTYPES[dtype])
    latents = _starting_latents(pipe, batch)
    run = lambda: pipe.txt2img([PROMPT] * batch, NEGATIVE_PROMPT, sampler=sampler, steps=steps,
                               init_latents=latents, output_type="float32")
    before, recording[0] = events.copy(), True
    start = time.perf_counter()
    run()
    first_call = time.perf_counter() - start
    recording[0] = False
    during = events - before
    warm = statistics.median(measure.timed(run, repeats))
    print(json.dumps(dict(size=pipe.default_size(), first_call_s=first_call, warm_call_s=warm,
                          compile_s=first_call - warm, traces=pipe.num_compilations,
                          programs_loaded=pipe.num_programs_loaded,
                          **{key: during[event] for key, event in CACHE_EVENTS.items()},
                          **{key: phases[event] for key, event in PHASE_EVENTS.items()})))

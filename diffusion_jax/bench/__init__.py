"""`diffusion-jax bench`: figures measured in one run, ours against diffusers PyTorch on the
same config and weights (random, from our own init).

    unet     U-Net forward                                  (models.py)
    train    one AdamW training step of the U-Net (models.py) or flow transformer
             (flow_transformers.py)
    vae      VAE encode (posterior mean) + decode           (models.py)
    transformer  Flux.1's or SD3's flow transformer forward (flow_transformers.py)
    sample   txt2img seconds per image                      (sampling.py)
    compile  first vs second process with the persistent compilation cache  (sampling.py)
    memory   XLA's per-device memory of a training config's U-Net step on N devices (memory.py)

Every model benchmark reports the median time after a warm-up, images/s, achieved FLOP/s
(XLA's cost analysis of the executable timed) and its share of a matmul peak measured in the
same process, peak memory, compile time and the device (measure.py). With `compare_torch`,
`ratio_vs_torch` is our throughput over PyTorch's: above 1, we are faster.

Importing this package is light (the CLI reads `BENCHMARKS` to parse its arguments); a
benchmark's module, and JAX, load when it runs.
"""

import importlib
from typing import Any, Mapping

# name -> (module, function, the config sections it needs; "system": every section of the
# config's system, see system.py; "denoiser": its denoiser's)
BENCHMARKS = {"unet": ("models", "bench_unet", ("unet",)),
              "train": ("models", "bench_train", "denoiser"),
              "vae": ("models", "bench_vae", ("vae",)),
              "transformer": ("flow_transformers", "bench_transformer", "system"),
              "sample": ("sampling", "bench_sample", "system"),
              "compile": ("sampling", "bench_compile", "system"),
              "memory": ("memory", "bench_memory", "system")}
# Benchmarks of a whole training config (its --config.KEY=VALUE overrides applied), compiled
# for --devices N fake CPU devices; the others take a config's model sections.
TRAINING_CONFIG_BENCHMARKS = ("memory",)


def required_sections(what: str, config: Mapping[str, Any]) -> tuple[str, ...]:
    sections = BENCHMARKS[what][2]
    if sections in ("system", "denoiser"):
        from diffusion_jax import system

        described = system.from_config(config)
        if sections == "denoiser":
            return (described.denoiser.name,)
        return described.config_sections
    return sections


def run(what: str, config: Mapping[str, Any], **options) -> dict:
    """The figures of benchmark `what` on a config's models (a dict of config sections)."""
    sections = required_sections(what, config)
    missing = [name for name in sections if name not in config]
    if missing:
        raise ValueError(f"bench {what} needs the config sections {list(sections)}; "
                         f"the config lacks {missing}")
    module, function, _ = BENCHMARKS[what]
    return getattr(importlib.import_module(f"diffusion_jax.bench.{module}"), function)(
        config, **options)


def print_result(result: Mapping[str, Any], json_path: str | None = None) -> None:
    from diffusion_jax.bench.measure import print_result as print_figures

    print_figures(result, json_path)

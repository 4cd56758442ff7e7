"""`diffusion-jax bench`: figures measured in one run, ours against diffusers PyTorch on the
same config and weights (random, from our own init).

    unet     U-Net forward                                  (models.py)
    train    one U-Net AdamW training step                  (models.py)
    vae      VAE encode (posterior mean) + decode           (models.py)
    sample   txt2img seconds per image                      (sampling.py)
    compile  first vs second process with the persistent compilation cache  (sampling.py)

Every model benchmark reports the median time after a warm-up, images/s, achieved FLOP/s
(XLA's cost analysis of the executable timed) and its share of a matmul peak measured in the
same process, peak memory, compile time and the device (measure.py). With `compare_torch`,
`ratio_vs_torch` is our throughput over PyTorch's: above 1, we are faster.
"""

from typing import Any, Mapping

from diffusion_jax.bench.measure import print_result
from diffusion_jax.bench.models import bench_train, bench_unet, bench_vae
from diffusion_jax.bench.sampling import bench_compile, bench_sample

BENCHMARKS = {"unet": bench_unet, "train": bench_train, "vae": bench_vae,
              "sample": bench_sample, "compile": bench_compile}
_SYSTEM = ("unet", "vae", "text_encoder", "schedule")
CONFIG_SECTIONS = {"unet": ("unet",), "train": ("unet",), "vae": ("vae",), "sample": _SYSTEM,
                   "compile": _SYSTEM}


def run(what: str, config: Mapping[str, Any], **options) -> dict:
    """The figures of benchmark `what` on a config's models (a dict of config sections)."""
    missing = [name for name in CONFIG_SECTIONS[what] if name not in config]
    if missing:
        raise ValueError(f"bench {what} needs the config sections {list(CONFIG_SECTIONS[what])}; "
                         f"the config lacks {missing}")
    return BENCHMARKS[what](config, **options)


__all__ = ["BENCHMARKS", "bench_compile", "bench_sample", "bench_train", "bench_unet",
           "bench_vae", "print_result", "run"]

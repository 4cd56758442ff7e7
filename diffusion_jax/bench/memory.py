"""`diffusion-jax bench memory`: XLA's per-device memory of a training config's U-Net step,
compiled (never run) for N devices without a single weight or data file.

The step is the trainer's own (`trainer.stage_program`, as `train --dry-run` compiles it),
over the config's mesh on N fake CPU devices standing in for accelerator chips, with the
attention the accelerators run (`jax.nn.dot_product_attention`). The figures are XLA CPU's
buffer assignment: TPU and GPU compilers fuse and schedule differently, so they estimate what
a chip needs rather than measure it.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from diffusion_jax import parallel
from diffusion_jax.bench import measure

STAGE = "diffusion"


def bench_memory(config: Any) -> dict:
    """`config`: a whole training config (ConfigDict, overrides applied); the devices are
    those of this process (the CLI fakes `--devices N` CPU ones)."""
    from diffusion_jax.training import preflight, trainer

    preflight.check_config(config)
    mesh = parallel.make_mesh(config.mesh)
    start = time.perf_counter()
    figures = preflight.compile_stage(config, trainer.model_config(config), mesh, STAGE,
                                      attention_impl="xla")
    figures["lower_and_compile_s"] = round(time.perf_counter() - start, 1)
    batch = trainer.STAGE[STAGE].batch_size(config)
    readable = {f"{key[len('xla_'):]}_per_device": parallel.format_bytes(figures[key])
                for key in ("xla_argument_bytes", "xla_output_bytes", "xla_temp_bytes",
                            "xla_alias_bytes", "xla_total_bytes") if key in figures}
    return dict(benchmark="memory", devices=jax.device_count(), mesh=dict(mesh.shape),
                global_batch=batch, per_device_batch=batch // jax.device_count(),
                dtype=config.dtype, remat=config.remat_policy or "none", **readable, **figures,
                **measure.peak_memory(), **measure.environment())

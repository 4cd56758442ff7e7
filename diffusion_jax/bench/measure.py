"""What every benchmark measures the same way: timing, FLOPs, the matmul peak, memory, device.

FLOPs come from XLA's cost analysis of the compiled executable that is timed. XLA counts a
convolution's multiply-adds over in-bounds window positions only, so a padded ("SAME") conv
counts fewer FLOPs than the textbook 2*N*H*W*Cout*kh*kw*Cin: e.g. 3x3 on 16x16 counts
(46/48)^2 = 92% of it (tests/test_bench.py checks both counts). Matmuls count 2*M*N*K exactly.
For a loop (`lax.scan`, `while`) XLA counts the body once, which is why the sampling benchmark
reports no FLOPs. With remat, recomputed ops are counted again: hardware FLOPs, not model FLOPs.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import xla_defaults

FLOPS_SOURCE = "xla_cost_analysis"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, each to completion (its result is waited on)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def warm_median(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(the warm-up call's result, median seconds of `repeats` calls after it)."""
    first = jax.block_until_ready(fn())
    return first, statistics.median(timed(fn, repeats))


class Compiled(NamedTuple):
    """A benchmark's program: the executable, seconds to lower and compile it, and what the
    result shows of the options it compiled with (compile_options_shown)."""

    executable: Any
    seconds: float
    options_shown: dict


def compile_timed(fn: Callable, *args, program_kind: str,
                  donate_argnums: tuple[int, ...] = ()) -> Compiled:
    """`fn` compiled with the XLA options of `program_kind` as the trainer and the pipeline
    compile theirs (xla_defaults). The benchmarks time this executable itself, so the FLOPs
    and memory reported are those of the program measured."""
    start = time.perf_counter()
    executable = jax.jit(fn, donate_argnums=donate_argnums,
                         compiler_options=xla_defaults.compiler_options(program_kind)
                         ).lower(*args).compile()
    return Compiled(executable, time.perf_counter() - start, compile_options_shown(program_kind))


def compile_options_shown(program_kind: str) -> dict:
    """What a benchmark prints of the options its program compiled with: the kind, the CPU's
    instruction set and the per-program XLA options ("" for none)."""
    options = xla_defaults.compiler_options(program_kind)
    return dict(program_kind=program_kind, cpu_isa=xla_defaults.cpu_isa(),
                xla_compiler_options=" ".join(f"{k}={v}" for k, v in options.items()))


def xla_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable. jax 0.10 returns a dict; older versions a
    list of dicts, one per program."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def xla_memory(compiled) -> dict:
    """XLA's buffer assignment of a compiled executable: bytes of arguments, outputs and
    temporaries (aliased = donated arguments reused as outputs). Empty where unsupported."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return {}
    if stats is None:
        return {}
    parts = dict(xla_argument_bytes=stats.argument_size_in_bytes,
                 xla_output_bytes=stats.output_size_in_bytes,
                 xla_temp_bytes=stats.temp_size_in_bytes,
                 xla_alias_bytes=stats.alias_size_in_bytes)
    parts["xla_total_bytes"] = (parts["xla_argument_bytes"] + parts["xla_output_bytes"]
                                + parts["xla_temp_bytes"] - parts["xla_alias_bytes"])
    return parts


@functools.lru_cache(maxsize=1)
def matmul_peak(runs: int = 5) -> dict:
    """The FLOP/s of a large jnp matmul, best of `runs`, measured once per process. On CPU,
    float32 2048x2048 (on the 2-core dev VM its best is higher than 4096x4096's, 55 vs 40
    GFLOP/s, in 1/8 of the time); on accelerators, bfloat16 8192x8192."""
    cpu = jax.devices()[0].platform == "cpu"
    n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best = min(timed(lambda: matmul(a, b), runs))
    return dict(matmul_peak_flop_per_s=2 * n ** 3 / best, matmul_peak_shape=f"{n}x{n}",
                matmul_peak_dtype=jnp.dtype(dtype).name)


def peak_memory() -> dict:
    """The process's peak RSS so far (Linux reports KiB, macOS bytes) and, where the device
    keeps it, the device's peak bytes in use."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = dict(peak_rss_bytes=rss if sys.platform == "darwin" else rss * 1024)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["device_peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    return result


def environment() -> dict:
    """Where a figure came from: the device, versions, XLA flags (ours: `xla_defaults`),
    cores and how busy the machine was."""
    device = jax.devices()[0]
    return dict(platform=device.platform, device_kind=device.device_kind,
                jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                cpu_count=os.cpu_count(), load_average_1min=round(os.getloadavg()[0], 2))


def throughput(batch: int, median_s: float, flops: float) -> dict:
    """Images/s and achieved FLOP/s of a call on `batch` images, and the share of the
    measured matmul peak that is."""
    peak = matmul_peak()
    achieved = flops / median_s
    return dict(median_s=median_s, images_per_s=batch / median_s, flops=flops,
                flops_source=FLOPS_SOURCE, flop_per_s=achieved, **peak,
                fraction_of_matmul_peak=achieved / peak["matmul_peak_flop_per_s"])


def print_result(result: Mapping[str, Any], json_path: str | None = None) -> None:
    width = max(map(len, result)) + 2
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}{shown}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


def output_difference(ours, reference) -> dict:
    """Max |ours - reference| and that over max(1, max |reference|): the relative error the
    parity tests bound."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    difference = float(np.max(np.abs(ours - reference)))
    return dict(max_abs_difference=difference,
                relative_difference=difference / max(1.0, float(np.max(np.abs(reference)))))

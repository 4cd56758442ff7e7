"""XLA CPU options this project measured to be faster: a process default applied before JAX
starts a backend, and options per compiled program (`compiler_options(kind)`).

jaxlib 0.10-0.11 hand convolutions and dots on CPU to YNNPACK by default. On the 2-core AVX2
machine of BENCHMARKS.md its convolutions are far slower than XLA's own (Eigen) kernels where
training spends its time: a 3x3 conv kernel gradient on [4, 128, 128, 64] takes 295 ms with
YNNPACK and 61 ms without (PyTorch's oneDNN: 36 ms), and the whole VAE encode + decode goes
0.66 -> 0.38 s, the U-Net train step 3.96 -> 3.66 s. So `import diffusion_jax` turns YNNPACK
off (`--xla_cpu_experimental_ynn_fusion_type=`), unless:

- XLA_FLAGS already names that flag (the user's choice wins),
- DIFFUSION_JAX_XLA_DEFAULTS=0 is set,
- the installed jaxlib is outside the versions known to have the flag (an unknown flag in
  XLA_FLAGS aborts the process), or
- a JAX backend already started in this process (XLA reads XLA_FLAGS once; then this module
  changes nothing, and says so at debug level).

It only affects the CPU backend; GPU and TPU programs compile as before.

Per program: the best choice depends on the program and the CPU. On a 2-core AVX-512 EPYC
VM (BENCHMARKS.md, alternating in one process, medians of 4) YNNPACK made the U-Net forward
15% faster (0.90 vs 1.05 s), the train step 4% (3.21 vs 3.35 s; 11% in issue 19's runs) and
the VAE 37% slower (0.61 vs 0.39 s); on the AVX2 machine it is slower for all three kinds.
On a 2-core AVX-512 Intel Xeon VM, YNNPACK for dots and reductions only (convolutions on
XLA's Eigen kernels) beat both all-on and off for the U-Net forward and train step, SD- and
SDXL-shaped (e.g. the SD-shaped train step 2.39 s vs 2.66 on, 3.27 off), and off stayed the
best for the VAE (0.30 s vs 0.38 dots-and-reductions, 0.44 on). So the
programs we compile (training steps, sampling loops, the VAE) pass
`compiler_options(kind)` to `jax.jit`, which XLA applies to that executable alone; the
process default covers everything else. The user's own flag still wins: when XLA_FLAGS
names it (before we added ours), or DIFFUSION_JAX_XLA_DEFAULTS=0, programs get no options.
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import metadata
from typing import Mapping

logger = logging.getLogger(__name__)

YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{YNNPACK_FLAG}=",)  # empty list: no op goes to YNNPACK
OPT_OUT = "DIFFUSION_JAX_XLA_DEFAULTS"
YNNPACK_OPTION = YNNPACK_FLAG.removeprefix("--")  # the DebugOptions field a compile option sets
YNNPACK_OFF = ""
# jaxlib 0.10's default spelled out (it compiles to the same HLO: tests/test_xla_defaults.py):
# with YNNPACK off for the process, a program that should use it must name the default.
YNNPACK_ON = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
              "LIBRARY_FUSION_TYPE_REDUCE")
# What a compiled program mostly does: a denoiser's (or adapter's) training step, a denoiser's
# forward passes (sampling loops, loss evaluation), the VAE (encode, decode, its training),
# anything else (evaluators' towers).
PROGRAM_KINDS = ("train_step", "forward", "vae", "other")
# YNNPACK for dots and reductions (attention, norms), XLA's Eigen kernels for convolutions.
YNNPACK_DOTS_AND_REDUCES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# What YNNPACK takes in each program kind, per CPU instruction set, as measured by
# alternating the choices in one process (BENCHMARKS.md); absent: off. Unmeasured kinds
# (and the AVX2 machine's dots-and-reductions choice) keep it off.
YNNPACK_FUSIONS = {
    "avx512": {"train_step": YNNPACK_DOTS_AND_REDUCES, "forward": YNNPACK_DOTS_AND_REDUCES},
    "avx2": {},
    "other": {},
}
# jaxlib versions (major, minor) whose XLA has the flag (0.10 measured here; 0.11 has it too).
KNOWN_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def flags_to_add(xla_flags: str, environ: dict[str, str] | os._Environ = os.environ,
                 jaxlib_version: tuple[int, int] | None = None) -> list[str]:
    """The default flags that `xla_flags` (the current XLA_FLAGS) should gain."""
    if environ.get(OPT_OUT, "1") == "0":
        return []
    version = jaxlib_version or _jaxlib_version()
    if version not in KNOWN_JAXLIB:
        return []
    return [flag for flag in DEFAULT_FLAGS if flag.split("=")[0] not in xla_flags]


# What `apply` appended to XLA_FLAGS, in the environment too: a subprocess (a training run,
# a benchmark block) inherits both, and must not take our flag for its user's choice.
ADDED = "DIFFUSION_JAX_ADDED_XLA_FLAGS"
_user_xla_flags: str | None = None  # XLA_FLAGS as the user set them, before `apply`


def user_flags(xla_flags: str, environ: Mapping[str, str]) -> str:
    """`xla_flags` without the flags this module added (in this process or a parent)."""
    ours = set(environ.get(ADDED, "").split())
    return " ".join(flag for flag in xla_flags.split() if flag not in ours)


def apply() -> None:
    """Append the defaults to XLA_FLAGS (idempotent; see the module docstring)."""
    global _user_xla_flags
    if _user_xla_flags is None:
        _user_xla_flags = user_flags(os.environ.get("XLA_FLAGS", ""), os.environ)
    added = flags_to_add(os.environ.get("XLA_FLAGS", ""))
    if not added:
        return
    if _backend_started():
        logger.debug("a JAX backend already started; XLA CPU defaults %s not applied", added)
        return
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *added]))
    os.environ[ADDED] = " ".join(added)


def cpu_isa(cpuinfo: str | None = None) -> str:
    """"avx512", "avx2" or "other": the widest x86 vector set this CPU has (Linux's
    /proc/cpuinfo flags, read once per process; elsewhere "other")."""
    if cpuinfo is None:
        return _this_cpu_isa()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


@functools.cache
def _this_cpu_isa() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_isa(f.read())
    except OSError:
        return "other"


def compiler_options(kind: str, *, backend: str | None = None, isa: str | None = None,
                     environ: Mapping[str, str] | None = None,
                     user_xla_flags: str | None = None) -> dict[str, str]:
    """The XLA options a program of `kind` (one of PROGRAM_KINDS) compiles with, for
    `jax.jit(..., compiler_options=...)`: YNNPACK on or off as measured for this kind and
    CPU; {} off the CPU backend, when the user chose the flag, opted out, or the jaxlib is
    not one known to have it. The keyword arguments stand in for the machine in tests."""
    if kind not in PROGRAM_KINDS:
        raise ValueError(f"unknown program kind {kind!r}; known: {list(PROGRAM_KINDS)}")
    environ = os.environ if environ is None else environ
    if user_xla_flags is not None:
        user = user_xla_flags
    elif _user_xla_flags is not None:
        user = _user_xla_flags
    else:
        user = user_flags(environ.get("XLA_FLAGS", ""), environ)
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu" or not flags_to_add(user, environ):
        return {}
    fusions = YNNPACK_FUSIONS.get(isa or cpu_isa(), {}).get(kind, YNNPACK_OFF)
    return {YNNPACK_OPTION: fusions}


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without the private module: assume it may have started
        return True
    return bool(xla_bridge.backends_are_initialized())

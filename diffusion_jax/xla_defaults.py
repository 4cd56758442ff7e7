"""XLA CPU defaults this project measured to be faster, applied before JAX starts a backend.

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
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

logger = logging.getLogger(__name__)

YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{YNNPACK_FLAG}=",)  # empty list: no op goes to YNNPACK
OPT_OUT = "DIFFUSION_JAX_XLA_DEFAULTS"
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


def apply() -> None:
    """Append the defaults to XLA_FLAGS (idempotent; see the module docstring)."""
    added = flags_to_add(os.environ.get("XLA_FLAGS", ""))
    if not added:
        return
    if _backend_started():
        logger.debug("a JAX backend already started; XLA CPU defaults %s not applied", added)
        return
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *added]))


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without the private module: assume it may have started
        return True
    return bool(xla_bridge.backends_are_initialized())

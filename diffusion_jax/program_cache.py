"""Exported programs on disk: a later process skips tracing and lowering, not only compiling.

JAX's persistent compilation cache (`jax_compilation_cache_dir`) saves the backend compile,
but it is looked up by the lowered program, so every process first traces the Flax modules and
lowers them to StableHLO: on the bench config that is 2.2 s of a 3.6 s start. Here the lowered
program itself is serialised with `jax.export` into a folder beside that cache, under a name
hashed from everything that shapes it:

- the caller's description (model config, dtype, sampler options),
- the arguments' tree structure, shapes, dtypes and shardings,
- the platform and device count,
- the jax, jaxlib and flax versions and the source of this package (an edit anywhere in
  diffusion_jax makes new entries; stale ones are never read).

The first process exports, writes and then runs the deserialised program; a later process
reads it, and the compile of that call hits the persistent cache. Programs that cannot be
exported (e.g. a custom call with no stability guarantee, as cuDNN attention on GPU) fall back
to plain `jax.jit` with a one-line warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from etils import epath
from jax import export

from diffusion_jax import xla_defaults

logger = logging.getLogger(__name__)
SUBDIRECTORY = "diffusion_jax_programs"
SUFFIX = ".jaxexport"
PACKAGE_ROOT = Path(__file__).resolve().parent


def directory() -> epath.Path | None:
    """Where exported programs live: beside the persistent compilation cache, or None when
    that cache is off (then nothing is written anywhere)."""
    cache_dir = jax.config.jax_compilation_cache_dir
    return epath.Path(cache_dir) / SUBDIRECTORY if cache_dir else None


@functools.cache
def code_fingerprint() -> str:
    """sha256 of this package's Python source and the versions of what lowers it."""
    digest = hashlib.sha256()
    for name in ("jax", "jaxlib", "flax"):
        digest.update(f"{name}={metadata.version(name)};".encode())
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def program_key(description: Mapping[str, Any], args: tuple) -> str:
    """The file name of a program: a hash of its description, its arguments' avals and
    shardings, the devices and the code."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    avals = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    devices = jax.devices()
    spec = dict(description=description, tree=str(treedef), avals=avals,
                platform=devices[0].platform, device_kind=devices[0].device_kind,
                device_count=len(devices), process_count=jax.process_count(),
                code=code_fingerprint())
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def load_or_export(jitted: Callable, args: tuple, description: Mapping[str, Any], *,
                   mesh: jax.sharding.Mesh, program_kind: str = "other") -> tuple[Callable, str]:
    """(a callable equal to `jitted` on arguments shaped like `args`, where it came from):
    the exported program read from the cache folder ("read"), or exported now and written
    there ("exported"), or `jitted` itself when the cache is off or the program cannot be
    exported ("jit"). `jitted` is a `jax.jit` function whose shardings (recorded in the
    export) are over `mesh`; an exported program compiles with the XLA options of
    `program_kind` (xla_defaults), as `jitted` does."""
    folder = directory()
    if folder is None:
        return jitted, "jit"
    path = folder / (program_key(description, args) + SUFFIX)
    exported, source = _read(path), "read"
    if exported is None:
        try:
            exported = export.export(jitted)(*args)
            data = exported.serialize()
        except Exception as error:  # noqa: BLE001 - any export failure means: run it unexported
            logger.warning("not caching the lowered program (%s: %s); running it with jax.jit",
                           type(error).__name__, str(error).splitlines()[0][:200])
            return jitted, "jit"
        _write(path, data)
        source = "exported"
    shardings = lambda flat: jax.tree_util.tree_unflatten(exported.in_tree, flat)[0]
    out_shardings = jax.tree_util.tree_unflatten(exported.out_tree,
                                                 exported.out_shardings_jax(mesh))
    return jax.jit(exported.call, in_shardings=shardings(exported.in_shardings_jax(mesh)),
                   out_shardings=out_shardings,
                   compiler_options=xla_defaults.compiler_options(program_kind)), source


def _read(path: epath.Path) -> export.Exported | None:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, OSError):
        return None
    try:
        return export.deserialize(bytearray(data))
    except Exception as error:  # noqa: BLE001 - a torn or foreign file is re-exported
        logger.warning("ignoring unreadable exported program %s (%s)", path, error)
        return None


def _write(path: epath.Path, data: bytes) -> None:
    """Write beside and rename, so a reader never sees half a file (processes may race)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        partial.write_bytes(data)
        partial.rename(path)
    except OSError as error:  # a read-only cache costs the next process a trace, nothing else
        logger.warning("could not write exported program %s (%s)", path, error)

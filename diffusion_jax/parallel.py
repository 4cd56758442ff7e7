"""Device mesh, sharding rules and multi-host start-up: from one CPU to a TPU pod, one code path.

A run lays all its devices out as a 2-D mesh with axes ("data", "fsdp"). The batch is split
over both axes together (every device sees different rows); params are fully sharded data
parallel: each large array is split over "fsdp" along one dimension and gathered by XLA where
a computation needs it, small arrays are replicated. With fsdp=1 this is plain data parallel.

    initialize_distributed()                       # first, before anything touches a device
    mesh = make_mesh(config.mesh)
    shardings = param_shardings(jax.eval_shape(init, rng), mesh, config.mesh.fsdp_min_size)
    params = jax.jit(init, out_shardings=shardings)(rng)   # or shard_params(params, shardings)
    step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), ...)
    step(params, global_batch(local_numpy_batch, mesh))

Every process runs the same program on its own slice of the data: `global_batch` joins the
processes' rows into one global array, so a step never moves input data between hosts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch's leading dimension is split over the whole mesh


def default_mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # Data-parallel ways: params replicated across them. -1: every device fsdp leaves.
        data=-1,
        # Ways each large param (and its optimizer state) is split; the batch is split over
        # these devices too. -1: every device data leaves.
        fsdp=1,
        # Arrays with fewer elements than this stay replicated: sharding them saves little
        # memory and costs one all-gather each.
        fsdp_min_size=2 ** 18,
    ))


# ----------------------------------------------------------------------------------------------
# Multi-host start-up


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _host_count(variable: str) -> int:
    """Number of hosts in a comma-separated host list such as TPU_WORKER_HOSTNAMES (0 if unset)."""
    return len([h for h in os.environ.get(variable, "").split(",") if h.strip()])


def _cluster_is_multi_process() -> bool:
    """Whether a cluster manager launched this process as one of several.

    jax.distributed.initialize() detects these clusters itself and reads the coordinator and
    process id from them; here we only decide whether to call it: a single process has
    nothing to join, and outside a cluster initialize() raises for want of a coordinator.
    """
    if (_env_int("SLURM_NTASKS") or 1) > 1:
        return True
    # Cloud TPU under GKE lists the slice's workers; multislice runs say how many slices.
    if max(_host_count("TPU_PROCESS_ADDRESSES"), _host_count("TPU_WORKER_HOSTNAMES")) > 1:
        return True
    return (_env_int("MEGASCALE_NUM_SLICES") or 1) > 1


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to a multi-host run; a no-op on a single process. Call it first.

    Multi-host is decided from, in order: the arguments, then the environment variables
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (a num_processes of 1 means
    one process), then SLURM (SLURM_NTASKS > 1) and Cloud TPU (TPU_WORKER_HOSTNAMES or
    TPU_PROCESS_ADDRESSES listing several workers, MEGASCALE_NUM_SLICES > 1). Whatever is not
    given explicitly, jax.distributed.initialize() detects from the cluster: on a Cloud TPU VM
    pod, whose worker list lives in the VM metadata rather than the environment, setting only
    JAX_NUM_PROCESSES to the worker count is enough. Calling it again does nothing.
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")

    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if num_processes == 1 or not (explicit or _cluster_is_multi_process()):
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())


def process_info() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    return jax.process_index(), jax.process_count()


# ----------------------------------------------------------------------------------------------
# Mesh


def my_batches(num_batches: int) -> range:
    """The batches of a job of `num_batches` this process does: every process_count-th,
    from its index (all of them on one process)."""
    return range(jax.process_index(), num_batches, jax.process_count())


def gather_batches(local: list[np.ndarray], num_batches: int, row_shape: tuple[int, ...],
                   dtype: Any) -> list[np.ndarray]:
    """Every process's `my_batches` results (arrays [n, *row_shape] of `dtype`, any n), on
    every process, in batch order: what one process doing them all would hold. Exact: the
    bytes travel."""
    if jax.process_count() == 1:
        return list(local)
    from jax.experimental import multihost_utils

    count, dtype = jax.process_count(), np.dtype(dtype)
    rows = np.zeros(-(-num_batches // count), np.int32)  # rows of each of my batches
    rows[:len(local)] = [len(b) for b in local]
    raw = np.frombuffer(b"".join(np.ascontiguousarray(b, dtype).tobytes() for b in local),
                        np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int32)).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)  # allgather takes one shape everywhere
    padded[:raw.size] = raw
    every_raw = multihost_utils.process_allgather(padded)
    every_rows = multihost_utils.process_allgather(rows)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    out = []
    for k in range(num_batches):
        process, j = k % count, k // count
        start, n = int(every_rows[process][:j].sum()) * row_bytes, int(every_rows[process][j])
        chunk = np.asarray(every_raw[process][start:start + n * row_bytes])
        out.append(np.frombuffer(chunk.tobytes(), dtype).reshape(n, *row_shape))
    return out


def _mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """(data, fsdp) with a -1 resolved to the devices left over; a ValueError if they don't fit."""
    for name, size in (("data", data), ("fsdp", fsdp)):
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r}: must be a positive integer or -1 "
                             "(all devices the other axis leaves)")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: at most one axis can take "
                         "the remaining devices")
    if -1 in (data, fsdp):
        fixed_name, fixed = ("fsdp", fsdp) if data == -1 else ("data", data)
        if device_count % fixed:
            raise ValueError(f"mesh.{fixed_name}={fixed} does not divide the {device_count} "
                             f"devices; set mesh.{fixed_name} to a divisor of {device_count}")
        rest = device_count // fixed
        return (rest, fsdp) if data == -1 else (data, rest)
    if data * fsdp != device_count:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are "
                         f"{device_count}; set mesh.data and mesh.fsdp so their product is "
                         f"{device_count}, or one of them to -1 to take the remaining devices")
    return data, fsdp


def make_mesh(mesh_config: Mapping[str, Any], devices=None) -> Mesh:
    """The ("data", "fsdp") mesh over `devices` (default: every device of every process),
    sizes from `mesh_config.data` / `mesh_config.fsdp`, -1 meaning all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = _mesh_shape(mesh_config["data"], mesh_config["fsdp"], len(devices))
    # Auto axes: shardings are given at jit boundaries and XLA propagates them inside, as in
    # big_vision; jax.make_mesh would otherwise default to Explicit axes (sharding in types).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------------------------
# Sharding rules


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Shard the largest dimension that the fsdp axis divides (the last such on ties, usually a
    kernel's output features); replicate small arrays and those with no divisible dimension."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: (shape[i], i))
    return PartitionSpec(*(("fsdp" if i == axis else None) for i in range(len(shape))))


def param_partition_specs(params_or_shapes: Any, mesh: Mesh, min_size: int) -> Any:
    """A PartitionSpec per leaf of a tree of arrays or `jax.ShapeDtypeStruct`s (from
    `jax.eval_shape`, so this runs before any param exists). Any tree works: optimizer states
    whose leaves mirror the params get the same specs, their scalar counters are replicated."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda leaf: _fsdp_spec(tuple(leaf.shape), fsdp_size, min_size),
                        params_or_shapes)


def param_shardings(params_or_shapes: Any, mesh: Mesh, min_size: int) -> Any:
    """`param_partition_specs` as NamedShardings on `mesh`, for jit's in/out_shardings."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                        param_partition_specs(params_or_shapes, mesh, min_size),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices of the mesh, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device: scalars, rngs, step counters, metrics."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# Data and params onto the mesh


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global batch from each process's own rows: process p's rows land on p's devices.

    The global batch is the processes' local batches stacked in process order, so every
    process must pass the same number of rows, a multiple of its number of devices.
    """
    local_devices = len(mesh.local_devices)
    for name, value in local_batch.items():
        rows = np.shape(value)[0] if np.ndim(value) else None
        if rows is None or rows % local_devices:
            raise ValueError(f"batch[{name!r}] has shape {np.shape(value)}: its leading dimension "
                             f"must be a multiple of this process's {local_devices} devices; "
                             "make the per-process batch size a multiple of "
                             f"{local_devices}")
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}


def shard_params(params: Any, shardings: Any) -> Any:
    """Params (host or device arrays, the same on every process) placed onto `shardings`."""
    if jax.process_count() > 1:
        # From host copies: jax.device_put of an uncommitted device array (what init under
        # jit returns) onto a sharding spanning processes yields arrays whose shards cannot
        # be read back (jax 0.10.2), so Orbax fails to save them.
        params = jax.device_get(params)
    return jax.device_put(params, shardings)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def abstract(tree: Any, shardings: Any) -> Any:
    """A tree of arrays or shapes as ShapeDtypeStructs carrying `shardings` (a matching tree):
    restore templates and abstract jit arguments."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _leaves_with_shardings(tree: Any, shardings: Any) -> list:
    leaves = jax.tree.leaves(tree)
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(sharding_leaves):
        raise ValueError(f"{len(leaves)} params but {len(sharding_leaves)} shardings")
    return list(zip(leaves, sharding_leaves))


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of arrays or shapes placed on `shardings`."""
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in _leaves_with_shardings(tree, shardings))


def describe(params: Any, shardings: Any) -> str:
    """A few lines for the log: sizes in total and per device, arrays sharded vs replicated.
    `params` may be arrays or ShapeDtypeStructs."""
    pairs = _leaves_with_shardings(params, shardings)
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x, _ in pairs)
    per_device = per_device_bytes(params, shardings)
    sharded = sum(not s.is_fully_replicated for _, s in pairs)
    mesh = pairs[0][1].mesh if pairs else None
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) if mesh else "none"
    scalars = sum(math.prod(x.shape) for x, _ in pairs)
    return (f"params: {scalars:,} in {len(pairs)} arrays, {format_bytes(total)}\n"
            f"mesh: {mesh_text}; {sharded} arrays sharded over fsdp, "
            f"{len(pairs) - sharded} replicated\n"
            f"per device: {format_bytes(per_device)} of params")


def every_process(value: Any) -> list:
    """[process 0's value, process 1's, ...] of a JSON value on every process. Orbax writes
    JSON items from process 0 only, so per-process state (the data iterators) goes in as a
    list that each process indexes on restore."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size])).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)  # allgather takes one shape everywhere
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]

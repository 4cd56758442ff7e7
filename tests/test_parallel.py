"""Mesh, fsdp sharding rules, global batches and multi-host start-up (diffusion_jax.parallel).

The checks that need several devices run this file as a script in a subprocess with 8 fake CPU
devices (this pytest process may already hold a 1-device JAX backend); the script measures and
writes a JSON report, and the tests below judge it.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from diffusion_jax import parallel
from diffusion_jax.models import KINDS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_SIZE = 4096  # shards the tiny U-Net's bigger kernels, keeps its biases and norms whole
GRAD_TOLERANCE = 1e-5  # per array: max|g8 - g1| / max|g1|


def _tiny_unet_config():
    from diffusion_jax.configs import tiny
    return KINDS["unet"].config_from_dict(tiny.get_config().unet)


def _paths_and_leaves(tree, is_leaf=None):
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def _is_spec(x):
    return isinstance(x, P)


# ----------------------------------------------------------------------------------------------
# Config and mesh sizes (one device is enough: sizes are checked before devices are touched)


def test_default_mesh_config():
    config = parallel.default_mesh_config()
    assert config.to_dict() == dict(data=-1, fsdp=1, fsdp_min_size=2 ** 18)
    mesh = parallel.make_mesh(config, devices=jax.devices()[:1])  # a ConfigDict, as configs give
    assert dict(mesh.shape) == dict(data=1, fsdp=1)


@pytest.mark.parametrize("data,fsdp", [(-1, 1), (1, -1), (1, 1)])
def test_make_mesh_on_one_device(data, fsdp):
    mesh = parallel.make_mesh(dict(data=data, fsdp=fsdp), devices=jax.devices()[:1])
    assert dict(mesh.shape) == dict(data=1, fsdp=1)
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize("data,fsdp,message", [
    (2, 4, r"mesh data=2 x fsdp=4 = 8 devices, but there are 1; .*product is 1"),
    (3, -1, r"mesh.data=3 does not divide the 1 devices; set mesh.data to a divisor of 1"),
    (-1, -1, r"both -1"),
    (0, 1, r"mesh.data=0: must be a positive integer or -1"),
])
def test_bad_mesh_sizes_are_clear_errors(data, fsdp, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(dict(data=data, fsdp=fsdp), devices=jax.devices()[:1])


# ----------------------------------------------------------------------------------------------
# Partition specs: only the mesh's axis sizes matter, so an AbstractMesh stands in for 8 devices

MESH_2x4 = AbstractMesh((2, 4), parallel.AXES)


@pytest.mark.parametrize("shape,expected", [
    ((64, 128), P(None, "fsdp")),             # the largest dim
    ((128, 64), P("fsdp", None)),
    ((3, 3, 64, 64), P(None, None, None, "fsdp")),  # ties: the last (output features)
    ((1002, 8), P(None, "fsdp")),             # the largest dim is not divisible: the next one
    ((1001, 7), P()),                         # nothing divisible by 4: replicated
    ((65, 64), P(None, "fsdp")),             # 65 is not divisible
    ((4095,), P()),                           # below min_size
    ((4096,), P("fsdp")),                     # min_size itself is sharded
    ((), P()),                                # scalars (optimizer step counters)
])
def test_partition_spec_rule(shape, expected):
    tree = {"x": jax.ShapeDtypeStruct(shape, jnp.float32)}
    assert parallel.param_partition_specs(tree, MESH_2x4, MIN_SIZE)["x"] == expected


def test_partition_specs_work_on_arrays_too():
    tree = {"big": np.zeros((64, 128), np.float32), "small": np.zeros((8,), np.float32)}
    assert parallel.param_partition_specs(tree, MESH_2x4, MIN_SIZE) == {
        "big": P(None, "fsdp"), "small": P()}


def test_partition_specs_on_tiny_unet():
    shapes = KINDS["unet"].param_shapes(_tiny_unet_config())
    specs = dict(_paths_and_leaves(parallel.param_partition_specs(shapes, MESH_2x4, MIN_SIZE),
                                   is_leaf=_is_spec))
    leaves = dict(_paths_and_leaves(shapes))
    assert specs.keys() == leaves.keys()
    sharded = 0
    for path, leaf in leaves.items():
        shape, spec = leaf.shape, specs[path]
        divisible = [n for n in shape if n % 4 == 0]
        if spec == P():
            assert math.prod(shape) < MIN_SIZE or not divisible, (path, shape)
            continue
        sharded += 1
        assert math.prod(shape) >= MIN_SIZE and tuple(spec).count("fsdp") == 1, (path, spec)
        axis = tuple(spec).index("fsdp")
        assert shape[axis] % 4 == 0 and shape[axis] == max(divisible), (path, shape, spec)
    assert 30 <= sharded <= len(leaves) - 100, f"{sharded} of {len(leaves)} arrays sharded"
    assert specs["['conv_in']['kernel']"] == P()  # 3*3*4*32 = 1152 < MIN_SIZE
    assert specs["['mid_block']['resnets_0']['conv1']['bias']"] == P()
    assert specs["['up_blocks_0']['resnets_0']['conv1']['kernel']"] == P(None, None, "fsdp", None)
    assert specs["['time_embedding']['linear_2']['kernel']"] == P(None, "fsdp")


def test_fsdp_of_one_replicates_everything():
    shapes = KINDS["unet"].param_shapes(_tiny_unet_config())
    specs = parallel.param_partition_specs(shapes, AbstractMesh((8, 1), parallel.AXES), 1)
    assert all(spec == P() for spec in jax.tree.leaves(specs, is_leaf=_is_spec))


def test_describe_sd15_unet_on_fsdp_8():
    """At real scale the default threshold shards nearly all bytes: per device ~1/8 of params."""
    from diffusion_jax.configs import sd15
    component = KINDS["unet"]
    shapes = component.param_shapes(component.config_from_dict(sd15.get_config().unet))
    mesh = AbstractMesh((1, 8), parallel.AXES)
    shardings = parallel.param_shardings(shapes, mesh, parallel.default_mesh_config().fsdp_min_size)
    text = parallel.describe(shapes, shardings)
    print(text)
    is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    n_sharded = sum(not sharding.is_fully_replicated
                    for sharding in jax.tree.leaves(shardings, is_leaf=is_sharding))
    n_arrays = len(jax.tree.leaves(shapes))
    assert f"{n_arrays} arrays" in text and f"{n_sharded} arrays sharded" in text
    assert f"{n_arrays - n_sharded} replicated" in text and "data=1, fsdp=8" in text
    total_gib = float(re.search(r"arrays, ([\d.]+) GiB", text).group(1))
    per_device_mib = float(re.search(r"per device: ([\d.]+) MiB", text).group(1))
    assert abs(total_gib - 859_520_964 * 4 / 2 ** 30) < 0.05
    assert per_device_mib < 1.1 * total_gib * 1024 / 8


# ----------------------------------------------------------------------------------------------
# Multi-host start-up (jax.distributed.initialize mocked: a real coordinator is a later test)

CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                     "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                     "MEGASCALE_NUM_SLICES")


@pytest.fixture
def initialize_calls(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    return calls


def _call(coordinator_address=None, num_processes=None, process_id=None):
    return dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id)


def test_initialize_distributed_is_a_no_op_on_one_process(initialize_calls, monkeypatch):
    parallel.initialize_distributed()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
    parallel.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    parallel.initialize_distributed()
    parallel.initialize_distributed(num_processes=1)
    assert initialize_calls == []
    assert parallel.process_info() == (0, 1)


def test_initialize_distributed_reads_jax_variables(initialize_calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    parallel.initialize_distributed()
    parallel.initialize_distributed()  # idempotent
    assert initialize_calls == [_call("10.0.0.1:1234", 4, 2)]


def test_initialize_distributed_arguments_override_variables(initialize_calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    parallel.initialize_distributed("host0:5678", 2, 1)
    assert initialize_calls == [_call("host0:5678", 2, 1)]


@pytest.mark.parametrize("variable,value", [
    ("SLURM_NTASKS", "4"),
    ("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3"),
    ("TPU_PROCESS_ADDRESSES", "10.0.0.1:8476,10.0.0.2:8476"),
    ("MEGASCALE_NUM_SLICES", "2"),
])
def test_initialize_distributed_lets_jax_detect_clusters(initialize_calls, monkeypatch,
                                                         variable, value):
    monkeypatch.setenv(variable, value)
    parallel.initialize_distributed()
    assert initialize_calls == [_call()]  # coordinator and process id come from the cluster


def test_initialize_distributed_num_processes_alone_defers_the_rest(initialize_calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "16")  # a Cloud TPU VM pod: the rest is in metadata
    parallel.initialize_distributed()
    assert initialize_calls == [_call(num_processes=16)]


def test_initialize_distributed_rejects_bad_variables(initialize_calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four' is not an integer"):
        parallel.initialize_distributed()
    assert initialize_calls == []


# ----------------------------------------------------------------------------------------------
# Global batch on this process's single device


def test_global_batch_on_one_process():
    mesh = parallel.make_mesh(dict(data=-1, fsdp=1), devices=jax.devices()[:1])
    local = {"image": np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2),
             "ids": np.arange(8, dtype=np.int32).reshape(4, 2)}
    batch = parallel.global_batch(local, mesh)
    assert batch.keys() == local.keys()
    for name, value in local.items():
        assert isinstance(batch[name], jax.Array) and batch[name].dtype == value.dtype
        assert batch[name].sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(batch[name]), value)
    with pytest.raises(ValueError, match=r"batch\['label'\] has shape \(\)"):
        parallel.global_batch({"label": np.int32(3)}, mesh)


# ----------------------------------------------------------------------------------------------
# 8 devices: measured in a subprocess by `_eight_device_report`, judged here


def test_eight_devices(tmp_path):
    """One test, so pytest-xdist's workers never run the subprocess twice."""
    report = _eight_device_report_from_subprocess(tmp_path / "report.json")
    _check_meshes(report)
    _check_sharded_params(report)
    _check_same_loss_and_grads(report)
    _check_global_batch(report)


def _eight_device_report_from_subprocess(out) -> dict:
    # LLVM optimisation off halves the compile time of the two U-Net gradients and leaves the
    # SPMD partitioning under test alone (both device counts compile the same way).
    xla_flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    # PYTHONPATH: this checkout and its `configs/`, as conftest.py gives pytest.
    python_path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags, "PYTHONPATH": python_path}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def _check_meshes(report):
    assert report["device_count"] == 8
    assert report["meshes"] == {
        "-1,1": {"shape": {"data": 8, "fsdp": 1}, "devices": list(range(8))},
        "2,4": {"shape": {"data": 2, "fsdp": 4}, "devices": list(range(8))},
        "-1,2": {"shape": {"data": 4, "fsdp": 2}, "devices": list(range(8))},
    }
    assert report["errors"]["2,2"].startswith("mesh data=2 x fsdp=2 = 4 devices, but there are 8")
    assert report["errors"]["3,-1"].startswith("mesh.data=3 does not divide the 8 devices")


def _check_sharded_params(report):
    arrays = report["arrays"]
    sharded = {path: a for path, a in arrays.items() if a["spec"]}
    assert 30 <= len(sharded) <= len(arrays) - 100
    for path, a in arrays.items():
        assert a["sharding_spec"] == a["spec"] and a["values_equal"], path
        shape, shards = a["shape"], a["shard_shapes"]
        assert len(shards) == 8, path
        if path in sharded:
            axis = a["spec"].index("fsdp")
            expected = shape[:axis] + [shape[axis] // 4] + shape[axis + 1:]
            assert all(s == expected for s in shards), (path, shape, shards)
        else:
            assert all(s == shape for s in shards), (path, shape, shards)
    assert report["describe"].splitlines()[1] == (
        f"mesh: data=2, fsdp=4; {len(sharded)} arrays sharded over fsdp, "
        f"{len(arrays) - len(sharded)} replicated")


def _check_same_loss_and_grads(report):
    parity = report["parity"]
    print(f"loss 1 device {parity['loss_1']:.8f}, 8 devices {parity['loss_8']:.8f}; "
          f"worst grad error {parity['worst_grad_error']:.2e} at {parity['worst_grad_path']}")
    assert parity["loss_1"] > 0.1 and parity["min_grad_scale"] > 0
    assert abs(parity["loss_8"] - parity["loss_1"]) <= GRAD_TOLERANCE * parity["loss_1"]
    assert parity["worst_grad_error"] <= GRAD_TOLERANCE
    assert parity["grad_specs_match_params"]


def _check_global_batch(report):
    batch = report["global_batch"]
    assert batch["values_equal"] and batch["shard_shapes"] == [[2, 3]] * 8
    assert "multiple of this process's 8 devices" in batch["error"]


def _random_params(shapes) -> dict:
    """Random params of the given shapes at init-like scales. Not the model's own init: run
    op by op on a shared 2-core CPU, that takes far longer than this whole file may."""
    rng = np.random.default_rng(0)

    def draw(leaf):
        if len(leaf.shape) == 1:  # biases and norm scales
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(draw, shapes)


def _eight_device_report() -> dict:
    """Everything the 8-device tests judge; run in a process with 8 fake CPU devices."""
    from diffusion_jax.models.unet import UNet2DConditionModel

    report = {"device_count": jax.device_count(), "meshes": {}, "errors": {}}
    for data, fsdp in [(-1, 1), (2, 4), (-1, 2)]:
        mesh = parallel.make_mesh(dict(data=data, fsdp=fsdp))
        report["meshes"][f"{data},{fsdp}"] = {
            "shape": dict(mesh.shape), "devices": [d.id for d in mesh.devices.flat]}
    for data, fsdp in [(2, 2), (3, -1)]:
        try:
            parallel.make_mesh(dict(data=data, fsdp=fsdp))
        except ValueError as e:
            report["errors"][f"{data},{fsdp}"] = str(e)

    config = _tiny_unet_config()
    params = _random_params(KINDS["unet"].param_shapes(config))
    mesh8 = parallel.make_mesh(dict(data=2, fsdp=4))
    shardings8 = parallel.param_shardings(params, mesh8, MIN_SIZE)
    params8 = parallel.shard_params(params, shardings8)
    specs = dict(_paths_and_leaves(parallel.param_partition_specs(params, mesh8, MIN_SIZE),
                                   is_leaf=_is_spec))
    report["arrays"] = {
        path: {"shape": list(x.shape), "spec": list(specs[path]),
               "sharding_spec": list(x.sharding.spec),
               "shard_shapes": [list(s.data.shape) for s in x.addressable_shards],
               "values_equal": bool(np.array_equal(np.asarray(x), np.asarray(original)))}
        for (path, x), (_, original) in zip(_paths_and_leaves(params8), _paths_and_leaves(params))}
    report["describe"] = parallel.describe(params8, shardings8)

    rng = np.random.default_rng(0)
    local_batch = {
        "latents": rng.standard_normal((8, 8, 8, config.in_channels)).astype(np.float32),
        "noise": rng.standard_normal((8, 8, 8, config.out_channels)).astype(np.float32),
        "timesteps": rng.integers(0, 1000, (8,)).astype(np.int32),
        "context": rng.standard_normal((8, 7, config.cross_attention_dim)).astype(np.float32),
    }
    model = UNet2DConditionModel(config)

    def loss_fn(p, batch):
        prediction = model.apply({"params": p}, batch["latents"], batch["timesteps"],
                                 batch["context"])
        return jnp.mean((prediction - batch["noise"]) ** 2)

    def loss_and_grads(mesh):
        shardings = parallel.param_shardings(params, mesh, MIN_SIZE)
        step = jax.jit(jax.value_and_grad(loss_fn),
                       in_shardings=(shardings, parallel.batch_sharding(mesh)),
                       out_shardings=(parallel.replicated(mesh), shardings))
        loss, grads = step(parallel.shard_params(params, shardings),
                           parallel.global_batch(local_batch, mesh))
        return float(loss), grads, shardings

    loss_1, grads_1, _ = loss_and_grads(parallel.make_mesh(dict(data=1, fsdp=1),
                                                           devices=jax.devices()[:1]))
    loss_8, grads_8, shardings_8 = loss_and_grads(mesh8)
    errors = {}
    for (path, g1), (_, g8) in zip(_paths_and_leaves(grads_1), _paths_and_leaves(grads_8)):
        g1, g8 = np.asarray(g1), np.asarray(g8)
        errors[path] = float(np.abs(g8 - g1).max() / np.abs(g1).max())
    worst = max(errors, key=errors.get)
    report["parity"] = {
        "loss_1": loss_1, "loss_8": loss_8, "worst_grad_error": errors[worst],
        "worst_grad_path": worst,
        "min_grad_scale": min(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads_1)),
        "grad_specs_match_params": all(
            g.sharding.spec == s.spec for g, s in zip(jax.tree.leaves(grads_8),
                                                      jax.tree.leaves(shardings_8))),
    }

    values = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = parallel.global_batch({"x": values}, mesh8)
    error = None
    try:
        parallel.global_batch({"x": np.zeros((6, 3), np.float32)}, mesh8)
    except ValueError as e:
        error = str(e)
    report["global_batch"] = {
        "values_equal": bool(np.array_equal(np.asarray(batch["x"]), values)),
        "shard_shapes": [list(s.data.shape) for s in batch["x"].addressable_shards],
        "error": error,
    }
    return report


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(_eight_device_report(), f)

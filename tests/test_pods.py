"""TPU pods: a gs:// workdir, and params sharded over several hosts.

GCS is faked in-process, at the three doors the code reaches it through: fsspec's `gs`
protocol (what etils.epath, and so this project and Orbax, use for files) maps to a local
folder that, like GCS, has no append; Orbax's TensorStore spec for gs:// arrays points at the
same folder; tensorboardX's gs:// event writer writes through epath. A URI mangled by pathlib
would instead land in the working directory as `gs:/...`, which the tests check is absent.

Several hosts: this file run as a script is one of two JAX processes on CPU (gloo
collectives), one device each, holding params sharded over both.
"""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (the multi-host workers)
    sys.path.insert(0, str(REPO))

from diffusion_jax import checkpoint, config_files, parallel  # noqa: E402
from diffusion_jax.training import trainer  # noqa: E402


# ----------------------------------------------------------------------------- fake GCS


def _fake_gcs_class():
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    class FakeGCS(DirFileSystem):
        """gs://BUCKET/KEY as ROOT/BUCKET/KEY. Like GCS, writing a key needs no parent
        "directory" and an object cannot be appended to (gcsfs turns mode "a" into "w")."""

        protocol = ("gs", "gcs")
        cachable = False
        root = ""

        def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...)
            super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return path.rstrip("/")

        def open(self, path, mode="rb", *args, **kwargs):
            if "a" in mode:
                raise OSError(f"{path}: GCS objects cannot be appended to")
            return super().open(path, mode, *args, **kwargs)

    return FakeGCS


class _EpathEventWriter:
    """tensorboardX's GCSRecordWriter (whole file re-uploaded on flush), through epath."""

    def __init__(self, path):
        from etils import epath

        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data):
        self.buffer.write(data)

    def flush(self):
        self.path.write_bytes(self.buffer.getvalue())

    def close(self):
        self.flush()


class _EpathEventWriterFactory:
    def open(self, path):
        return _EpathEventWriter(path)

    def directory_check(self, path):
        pass


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local folder behind gs://; the test runs in an empty working directory."""
    from etils.epath import backend as epath_backend
    from fsspec.registry import _registry
    from orbax.checkpoint._src.path import gcs_utils
    from tensorboardX import record_writer

    root = tmp_path / "gcs"
    root.mkdir()
    fake = _fake_gcs_class()
    fake.root = str(root)
    for protocol in fake.protocol:
        monkeypatch.setitem(_registry, protocol, fake)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def tensorstore_spec(path):
        name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": f"{root}/{name}/{key}"}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", tensorstore_spec)
    # Orbax asks google-cloud-storage whether the bucket has a hierarchical namespace
    # before deleting a step.
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _EpathEventWriterFactory())
    monkeypatch.setattr(record_writer, "GCS_ENABLED", True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert list(cwd.iterdir()) == []  # no gs:/... made by pathlib
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _config(**overrides):
    return {"unet": {"block_out_channels": [32]}, "vae": {}, "text_encoder": {},
            "schedule": {}, "tokenizer": {}, **overrides}


def _params(value):
    return {"conv": {"kernel": np.full((3, 3, 2, 4), value, np.float32)}}


# ----------------------------------------------------------------------------- gs:// paths


def test_checkpoints_grids_and_caches_on_gs(bucket, monkeypatch):
    from PIL import Image

    from diffusion_jax import image_files
    from diffusion_jax.eval import classifier

    assert str(checkpoint.as_path("gs://bucket/run")) == "gs://bucket/run"
    checkpoint.save("gs://bucket/ckpt", 3, {"unet": _params(1.0), "opt": _params(2.0)}, _config())
    assert checkpoint.steps("gs://bucket/ckpt") == [3]
    assert checkpoint.item_names("gs://bucket/ckpt") == ["opt", "unet"]
    assert checkpoint.read_config("gs://bucket/ckpt")["unet"]["block_out_channels"] == [32]
    items, _ = checkpoint.load("gs://bucket/ckpt")
    np.testing.assert_array_equal(items["unet"]["conv"]["kernel"], _params(1.0)["conv"]["kernel"])
    assert (bucket / "bucket" / "ckpt" / "3" / "unet").is_dir()

    manager = checkpoint.TrainingCheckpointer("gs://bucket/run/checkpoints", pytree_items=("unet",),
                                              json_items=("trainer",), keep=1, keep_best=0)
    assert str(manager.directory) == "gs://bucket/run/checkpoints"
    for step in (1, 2):
        manager.save(step, {"unet": _params(step)}, {"trainer": {"step": step}}, _config())
    manager.wait()
    assert checkpoint.steps("gs://bucket/run/checkpoints") == [2]  # step 1 deleted on GCS
    restored = manager.restore(2, {"unet": _params(0.0)}, ["trainer"])
    assert restored["trainer"] == {"step": 2} and float(restored["unet"]["conv"]["kernel"][0, 0, 0, 0]) == 2
    manager.close()

    images = np.linspace(0, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    image_files.save_grid(images, "gs://bucket/run/samples/grid.png", {"sampler": "ddim", "steps": 3})
    grid = Image.open(bucket / "bucket" / "run" / "samples" / "grid.png")
    assert grid.size == (8, 4) and grid.text == {"sampler": "ddim", "steps": "3"}

    params = classifier._init_params(0)
    classifier.save(params, "gs://bucket/run/classifier.safetensors", seed=0)
    monkeypatch.setattr(classifier, "train_classifier", lambda seed: pytest.fail("retrained"))
    cached = classifier.load_or_train("gs://bucket/run/classifier.safetensors", seed=0)
    jax.tree.map(np.testing.assert_array_equal, cached, params)


def test_training_in_a_gs_workdir_resumes_and_serves_load_and_export(bucket, tmp_path, caplog):
    from diffusion_jax import cli, pipeline

    config = config_files.load(REPO / "configs" / "tiny_train.py")
    config.vae_training.steps = 2
    config.training.steps = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.keep, config.checkpoint.keep_best = 1, 0  # a step deleted on GCS
    config.sample_every_steps = 1  # a grid during training (params gathered on every process)
    summary = trainer.train(config, "gs://bucket/run")
    run = bucket / "bucket" / "run"
    assert summary["workdir"] == "gs://bucket/run"
    assert summary["samples"] == "gs://bucket/run/samples/step_0000004.png"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png",
                                                                  "step_0000004.png"]
    curve = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(c["stage"], c["step"]) for c in curve if "loss" in c] == [("vae", 2), ("diffusion", 4)]
    assert [(c["stage"], c["step"]) for c in curve if "eval_loss" in c] == [("vae", 2), ("diffusion", 4)]
    assert json.loads((run / "summary.json").read_text())["samples"] == summary["samples"]
    (events,) = (run / "tensorboard").iterdir()
    assert b"diffusion/train/loss" in events.read_bytes()
    assert checkpoint.steps("gs://bucket/run/checkpoints") == [4]

    before = (run / "summary.json").read_text()
    # Everything done: the run says so and leaves its outputs as they are.
    assert trainer.train(config, "gs://bucket/run") == json.loads(before)
    assert (run / "summary.json").read_text() == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # 2 train + 2 eval lines
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png",
                                                                  "step_0000004.png"]
    config.training.steps = 3  # extended: resumes from the GCS checkpoint
    config.sample_every_steps = 0
    with caplog.at_level("INFO", logger="diffusion_jax.train"):
        trainer.train(config, "gs://bucket/run")
    assert "resuming from gs://bucket/run/checkpoints step 4" in caplog.text
    assert checkpoint.steps("gs://bucket/run/checkpoints") == [5]

    pipe = pipeline.load("gs://bucket/run/checkpoints", cache_dir=None)
    assert pipe.vae_config.scaling_factor == summary["vae_scaling_factor"]
    out = tmp_path / "exported"
    assert cli.main(["export", "--checkpoint", "gs://bucket/run/checkpoints", "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file()
    assert cli.main(["sample", "--checkpoint", "gs://bucket/run/checkpoints", "--prompt",
                     "a photo of a bag", "--steps", "2", "--out", "gs://bucket/out/bag.png"]) == 0
    from PIL import Image

    assert Image.open(bucket / "bucket" / "out" / "bag.png").text["prompt"] == "a photo of a bag"


def test_gs_without_its_packages_or_as_a_new_output_is_a_one_line_error(bucket, monkeypatch, capsys):
    from fsspec.registry import _registry, known_implementations
    from tensorboardX import record_writer

    from diffusion_jax import cli

    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    config = config_files.load(REPO / "configs" / "tiny_train.py")
    with pytest.raises(ValueError, match=r"need google-cloud-storage; pip install 'diffusion-jax\[gcs\]'"):
        trainer.train(config, "gs://bucket/run")
    assert list(bucket.iterdir()) == []

    assert cli.main(["export", "--checkpoint", "gs://bucket/x", "--out", "gs://bucket/y"]) == 1
    assert "gs://bucket/y: new directories are written locally only" in capsys.readouterr().err

    monkeypatch.delitem(_registry, "gs")  # as without gcsfs installed
    monkeypatch.setitem(known_implementations, "gs", {"class": "no_such_gcsfs.GCSFileSystem",
                                                      "err": "Please install gcsfs"})
    assert cli.main(["sample", "--checkpoint", "gs://bucket/run", "--prompt", "x",
                     "--out", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Please install gcsfs; pip install 'diffusion-jax[gcs]'" in err


# ----------------------------------------------------------------------------- several hosts


def _two_host_sampling_worker(process_id: int, port: int) -> None:
    """One of two processes: the tiny SD fixture's params fsdp-sharded over both hosts, sampled
    where they lie (no gather); both processes get every image."""
    from diffusion_jax import pipeline

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 2})
    fixtures = REPO / "tests" / "fixtures"
    host, config, _ = checkpoint.load_models(fixtures / "v1_checkpoint", use_ema=True)
    sharded = parallel.shard_params(host, parallel.param_shardings(host, mesh, 64))
    assert not all(x.is_fully_addressable for x in jax.tree.leaves(sharded["unet"]))
    pipe = pipeline.StableDiffusion(None, config, mesh=mesh, fsdp_min_size=64)
    images = pipe.txt2img(["a cat", "a dog"], "ugly", sampler="dpmpp_2m", steps=4, guidance=3.0,
                          seed=5, output_type="float32", params=sharded)
    expected = np.load(fixtures / "v1_checkpoint_pixels.npz")["txt2img"]
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    print(f"process {process_id}: sampled")


def test_sampling_from_params_sharded_over_two_hosts():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for i, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0 and f"process {i}: sampled" in output, output[-3000:]


if __name__ == "__main__":
    _two_host_sampling_worker(int(sys.argv[1]), int(sys.argv[2]))

"""DreamBooth with prior preservation (adapters/dreambooth.py, configs/tiny_dreambooth_train.py):
the loss, the batches, and a tiny LoRA run whose class images are the base's own samples,
drawn once and kept across reruns."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import cli, config_files, system
from diffusion_jax.adapters import dreambooth
from diffusion_jax.diffusion import process
from diffusion_jax.training import losses
from test_training import REPO

CONFIG = REPO / "configs" / "tiny_dreambooth_train.py"
CLASS_PROMPT = "a photo of a sneaker"
GROUP = pytest.mark.xdist_group("tiny_dreambooth_run")


def test_the_loss_is_the_instance_mean_plus_the_weighted_class_mean():
    """diffusers' train_dreambooth: mse(instance rows) + prior_loss_weight * mse(class rows),
    through the diffusion loss of the tiny model on one batch (2 instance, 2 class rows)."""
    sections = system.checkpoint_config(config_files.load(str(CONFIG)))
    towers = system.from_config(sections)
    params = system.init_params(towers, sections, seed=0)
    models = system.build(towers, sections)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
             "input_ids": np.zeros((4, sections["tokenizer"]["max_length"]), np.int32),
             "label": np.zeros(4, np.int32)}
    noise = process.from_config(sections["schedule"])
    plain = losses.diffusion_loss_fn(models, noise)
    with_prior = losses.diffusion_loss_fn(models, noise, prior_loss_weight=0.7)
    key = jax.random.key(1)
    loss, metrics = with_prior(params, {}, {**batch, "prior": np.array([0, 0, 1, 1], np.float32)},
                               key)
    mean, _ = plain(params, {}, batch, key)  # the same noise and times: rows are the same
    np.testing.assert_allclose(loss, metrics["instance_mse"] + 0.7 * metrics["prior_mse"],
                               rtol=1e-6)
    np.testing.assert_allclose((metrics["instance_mse"] + metrics["prior_mse"]) / 2, mean,
                               rtol=1e-6)
    assert abs(float(metrics["instance_mse"] - metrics["prior_mse"])) > 1e-4  # rows do differ


class _Rows:
    """A stand-in train iterator: batches of `value` rows, its state a counter."""

    def __init__(self, value):
        self.value, self.count = value, 0

    def __next__(self):
        self.count += 1
        return {"label": np.full(2, self.value), "input_ids": np.full((2, 3), self.count)}

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]


def test_batches_are_the_instance_rows_then_the_class_rows_flagged():
    iterator = dreambooth.PriorIterator(_Rows(1), _Rows(2))
    batch = next(iterator)
    np.testing.assert_array_equal(batch["label"], [1, 1, 2, 2])
    np.testing.assert_array_equal(batch["prior"], [0, 0, 1, 1])
    state = iterator.get_state()
    again = dreambooth.PriorIterator(_Rows(1), _Rows(2))
    again.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(again)["input_ids"], next(iterator)["input_ids"])
    with pytest.raises(ValueError, match="not a DreamBooth run's"):
        again.set_state({"elements": 0})


# ----------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from test_lora_train import random_base

    return random_base(CONFIG, tmp_path_factory.mktemp("dreambooth_base") / "ckpt")


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """Four photos of the subject (no captions: the instance prompt is theirs)."""
    root = tmp_path_factory.mktemp("instances")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / f"{i}.png")
    return root


def _train(workdir, base, instances, *extra):
    return cli.main(["train", "--config", str(CONFIG), "--workdir", str(workdir),
                     f"--config.init_from={base}", f"--config.data.path={instances}", *extra])


@pytest.fixture(scope="module")
def run(base, instances, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dreambooth_run")
    assert _train(workdir, base, instances) == 0
    return workdir


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@GROUP
def test_the_class_images_are_the_base_models_own_samples(base, run, tmp_path):
    """Image i is `sample` of the base at seed i with the section's sampler, its recipe in
    the PNG."""
    files = sorted(p.name for p in (run / "class_images").iterdir())
    assert files == [f"{i:05d}.png" for i in range(11)]
    drawn = Image.open(run / "class_images" / "00002.png")
    assert drawn.text["prompt"] == CLASS_PROMPT and json.loads(drawn.text["seeds"]) == [2]
    assert "Steps: 2, Sampler: DDIM" in drawn.text["parameters"]
    assert cli.main(["sample", "--checkpoint", str(base), "--prompt", CLASS_PROMPT, "--seed", "2",
                     "--sampler", "ddim", "--steps", "2", "--guidance", "7.5", "--height", "32",
                     "--width", "32", "--out", str(tmp_path / "base.png")]) == 0
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(Image.open(tmp_path / "base.png")))


@GROUP
def test_each_step_logs_both_losses_and_the_eval_loss_is_on_held_out_class_images(run):
    rows = _metrics(run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:  # the mse of all 8 rows is the mean of the two halves' (4 rows each)
        np.testing.assert_allclose(r["mse"], (r["instance_mse"] + r["prior_mse"]) / 2, rtol=1e-5)
    assert [r["step"] for r in rows if "eval_loss" in r] == [6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diffusion_train_step_compilations"] == 1


@GROUP
def test_a_rerun_draws_only_the_class_images_missing(base, instances, run, tmp_path, capfd):
    import shutil

    workdir = tmp_path / "again"
    shutil.copytree(run, workdir)
    kept = (workdir / "class_images" / "00000.png").stat().st_mtime_ns
    (workdir / "class_images" / "00002.png").unlink()
    capfd.readouterr()
    assert _train(workdir, base, instances, "--config.training.steps=8") == 0
    log = capfd.readouterr().err
    assert "resuming from" in log and "drawing 1 class images" in log
    assert (workdir / "class_images" / "00000.png").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(np.asarray(Image.open(workdir / "class_images" / "00002.png")),
                                  np.asarray(Image.open(run / "class_images" / "00002.png")))


@GROUP  # the base fixture, made once
@pytest.mark.parametrize("override, message", [
    ("--config.init_from=", "DreamBooth fine-tunes a base model"),
    ("--config.dreambooth.class_prompt=", "drop the dreambooth section and set --config.data.caption"),
    ("--config.dreambooth.prior_loss_weight=0", "must be > 0"),
    ("--config.dreambooth.num_class_images=3", "fewer than one batch of class rows"),
    ("--config.data.source=fashion_mnist", "DreamBooth trains on a folder of instance images"),
    ("--config.data.buckets.pixels=4096", "DreamBooth trains at data.image_size"),
])
def test_bad_dreambooth_sections_fail_in_one_line(base, instances, tmp_path, capsys, override,
                                                  message):
    from test_convert import assert_one_line_error

    rc = cli.main(["train", "--config", str(CONFIG), "--workdir", str(tmp_path / "w"),
                   f"--config.data.path={instances}", f"--config.init_from={base}", override,
                   "--dry-run"])
    assert_one_line_error(rc, capsys.readouterr().err, message)

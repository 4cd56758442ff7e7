"""The checkpoint format: Orbax steps of params items plus a JSON config item."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from diffusion_jax import checkpoint, system


def _config(**overrides):
    config = {"unet": {"block_out_channels": (32, 64)}, "vae": {"latent_channels": 4},
              "text_encoder": {"hidden_size": 32}, "schedule": {"prediction_type": "epsilon"},
              "tokenizer": {"pad_token": "!", "max_length": 77}}
    config.update(overrides)
    return config


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"conv_in": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                        "bias": rng.normal(size=(8,)).astype(np.float32)},
            "norm": {"scale": rng.normal(size=(8,)).astype(np.float32)}}


def _assert_tree_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_tree_equal(a[key], b[key])
        else:
            assert isinstance(a[key], np.ndarray), type(a[key])
            assert a[key].dtype == np.asarray(b[key]).dtype
            np.testing.assert_array_equal(a[key], np.asarray(b[key]))


def test_save_and_load_steps_items_and_config(tmp_path):
    directory = tmp_path / "ckpt"
    first = {"unet": _params(0), "vae": _params(1), "text_encoder": _params(2)}
    checkpoint.create(directory, first, _config())
    # A later training step: EMA params, a non-model item, and jax / bfloat16 arrays.
    later = {"unet": {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)},
             "unet_ema": _params(3), "opt_state": {"count": np.array(7, np.int32)}}
    checkpoint.save(directory, 1000, later, _config(schedule={"prediction_type": "v_prediction"}))

    assert checkpoint.steps(directory) == [0, 1000]
    assert checkpoint.item_names(directory) == ["opt_state", "unet", "unet_ema"]
    assert checkpoint.item_names(directory, 0) == ["text_encoder", "unet", "vae"]

    items, config = checkpoint.load(directory, step=0)
    for name in first:
        _assert_tree_equal(items[name], first[name])
    assert config == {**json.loads(json.dumps(_config())), "format_version": checkpoint.FORMAT_VERSION}
    assert config["unet"]["block_out_channels"] == [32, 64]

    items, config = checkpoint.load(directory)  # the latest step, model items only
    assert sorted(items) == ["unet", "unet_ema"]
    assert items["unet"]["w"].dtype == ml_dtypes.bfloat16
    _assert_tree_equal(items["unet"], {"w": np.asarray(later["unet"]["w"])})
    _assert_tree_equal(items["unet_ema"], later["unet_ema"])
    assert config["schedule"]["prediction_type"] == "v_prediction"

    items, _ = checkpoint.load(directory, items=["opt_state"])
    assert int(items["opt_state"]["count"]) == 7
    assert checkpoint.read_config(directory, 0)["schedule"]["prediction_type"] == "epsilon"


def test_missing_steps_items_and_sections_are_clear_errors(tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint.create(directory, {"unet": _params(0)}, _config())
    with pytest.raises(checkpoint.CheckpointError, match=r"has no step 5; steps: \[0\]"):
        checkpoint.load(directory, step=5)
    with pytest.raises(checkpoint.CheckpointError, match=r"no item\(s\) \['vae'\]; it holds \['unet'\]"):
        checkpoint.load(directory, items=["vae"])
    with pytest.raises(checkpoint.CheckpointError, match=r"lacks section\(s\) \['tokenizer'\]"):
        checkpoint.save(directory, 1, {"unet": _params(0)},
                        {k: v for k, v in _config().items() if k != "tokenizer"})
    with pytest.raises(ValueError, match="config item's name"):
        checkpoint.save(directory, 1, {"config": _params(0)}, _config())
    assert checkpoint.steps(directory) == [0]


@pytest.mark.parametrize("make", ["missing", "empty", "file", "step_without_config", "newer"])
def test_not_a_checkpoint(tmp_path, make):
    directory = tmp_path / "dir"
    if make == "empty":
        directory.mkdir()
    elif make == "file":
        directory.write_text("weights")
    elif make in ("step_without_config", "newer"):
        checkpoint.create(directory, {"unet": _params(0)}, _config())
        if make == "step_without_config":
            import shutil
            shutil.rmtree(directory / "0" / checkpoint.CONFIG_ITEM)
        else:
            metadata = next((directory / "0" / checkpoint.CONFIG_ITEM).glob("metadata"))
            content = json.loads(metadata.read_text())
            metadata.write_text(json.dumps({**content, "format_version": 99}))
    expected = {"missing": "no such directory", "empty": "no checkpoint step",
                "file": "it is a file", "step_without_config": "has no `config` item",
                "newer": "format_version 99"}[make]
    with pytest.raises(checkpoint.CheckpointError, match=expected) as info:
        checkpoint.load(directory)
    if make != "newer":
        assert f"{directory} is not a diffusion_jax checkpoint" in str(info.value)
        assert "diffusion-jax convert" in str(info.value)


def test_new_checkpoints_are_complete_or_absent(tmp_path):
    directory = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="interrupted"):
        with checkpoint.new_directory(directory) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

    directory.mkdir()  # an empty directory may be filled
    checkpoint.create(directory, {"unet": _params(0)}, _config())
    assert checkpoint.steps(directory) == [0]
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.create(directory, {"unet": _params(1)}, _config())
    _assert_tree_equal(checkpoint.load(directory)[0]["unet"], _params(0))
    with pytest.raises(FileNotFoundError, match="parent directory"):
        checkpoint.create(tmp_path / "no" / "such" / "parent", {"unet": _params(0)}, _config())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_training_checkpointer_keeps_the_latest_and_the_best_by_eval_loss(tmp_path):
    config = {name: {} for name in system.STABLE_DIFFUSION.config_sections}
    manager = checkpoint.TrainingCheckpointer(tmp_path / "ckpt", pytree_items=("unet",),
                                              json_items=("trainer",), keep=1, keep_best=1)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 4.0}
    for step, loss in losses.items():
        manager.save(step, {"unet": {"w": np.full((2,), step, np.float32)}}, {"trainer": {"s": step}},
                     config, None if loss is None else {"eval_loss": loss})
    manager.wait()
    assert checkpoint.steps(tmp_path / "ckpt") == [2, 5]
    restored = manager.restore(2, {"unet": {"w": np.zeros((2,), np.float32)}}, ["trainer"])
    assert restored["trainer"] == {"s": 2} and restored["unet"]["w"].tolist() == [2.0, 2.0]
    manager.close()


def _models(seed):
    return {name: _params(seed + i) for i, name in enumerate(("unet", "vae", "text_encoder"))}


def test_resolve_takes_a_workdir_or_a_step_folder(tmp_path):
    checkpoints = tmp_path / "workdir" / checkpoint.WORKDIR_CHECKPOINTS
    for step in (10, 20):
        checkpoint.save(checkpoints, step, _models(step), _config())
    assert checkpoint.resolve(checkpoints) == (checkpoints, 20)
    assert checkpoint.resolve(tmp_path / "workdir") == (checkpoints, 20)
    assert checkpoint.resolve(tmp_path / "workdir", 10) == (checkpoints, 10)
    assert checkpoint.resolve(checkpoints / "10") == (checkpoints, 10)
    assert checkpoint.resolve(checkpoints / "10", 10) == (checkpoints, 10)
    with pytest.raises(checkpoint.CheckpointError, match="is step 10 of checkpoint .* but step 20"):
        checkpoint.resolve(checkpoints / "10", 20)

    items, _, source = checkpoint.load_models(checkpoints / "10")
    _assert_tree_equal(items["vae"], _params(11))
    assert source == checkpoint.Source(str(checkpoints), 10, ema=False)
    assert checkpoint.display_name(source.directory) == "workdir"


def test_a_training_checkpoint_loads_quietly_with_ema_by_default(tmp_path, caplog):
    """A trainer's step also holds the optimizer state and JSON items: reading the models
    opens only their items, and Orbax says nothing about the others."""
    config = {name: {} for name in system.STABLE_DIFFUSION.config_sections}
    manager = checkpoint.TrainingCheckpointer(
        tmp_path / "ckpt", pytree_items=("unet", "unet_ema", "vae", "text_encoder", "optimizer"),
        json_items=("trainer",))
    manager.save(7, {**_models(0), "unet_ema": _params(9), "optimizer": {"mu": _params(5)}},
                 {"trainer": {"stage": "unet"}}, config)
    manager.close()

    caplog.set_level("WARNING")
    items, _, source = checkpoint.load_models(tmp_path / "ckpt")
    _assert_tree_equal(items["unet"], _params(9))
    assert source == checkpoint.Source(str(tmp_path / "ckpt"), 7, ema=True)
    items, _, source = checkpoint.load_models(tmp_path / "ckpt", use_ema=False)
    _assert_tree_equal(items["unet"], _params(0))
    assert not source.ema
    loaded, _ = checkpoint.load(tmp_path / "ckpt")
    assert sorted(loaded) == ["text_encoder", "unet", "unet_ema", "vae"]
    assert caplog.records == [], [r.getMessage() for r in caplog.records]

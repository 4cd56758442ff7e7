"""The diffusion loss through the system description: precomputed text embeddings (the batch's
`context`) train a frozen-text-tower model exactly as recomputing them does, without running
the text tower; a system with two text towers gets both towers' ids from the data pipeline
and its loss traces."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from diffusion_jax import system
from diffusion_jax.configs import tiny
from diffusion_jax.data import input_pipeline, precompute
from diffusion_jax.diffusion.schedule import Schedule
from diffusion_jax.training import losses
from diffusion_jax.training.state import TrainState, make_train_step

CAPTIONS = ["a photo of a sneaker", "a photo of a bag", "", "a photo of a coat"]


@pytest.fixture(scope="module")
def sd():
    """(config, models, params, a batch of precomputed latents and ids) of the tiny SD."""
    config = tiny.get_config()
    config.tokenizer.max_length = 16
    models = system.build(system.STABLE_DIFFUSION, config)
    params = system.init_params(system.STABLE_DIFFUSION, config, seed=0)
    ids = system.text_inputs(system.STABLE_DIFFUSION, config)(CAPTIONS)
    latents = np.random.default_rng(0).standard_normal((4, 8, 8, 4)).astype(np.float32)
    return config, models, params, {"latents": latents, **ids}


def _losses(config, models, trained, frozen, batch, steps=3):
    loss_fn = losses.diffusion_loss_fn(models, Schedule.from_config(config.schedule.to_dict()),
                                       min_snr_gamma=5.0, offset_noise=0.1)
    return _curve(loss_fn, trained, frozen, batch, steps)


def test_precomputed_context_gives_the_recomputed_loss_curve_without_the_text_tower(sd):
    config, models, params, batch = sd
    trained = {"unet": params["unet"]}
    encoded = _losses(config, models, trained,
                            {"vae": params["vae"], "text_encoder": params["text_encoder"]}, batch)
    context = system.encode_text(models, params, {"input_ids": batch["input_ids"]})["context"]
    # No text_encoder params at all: the loss must take the batch's context, not run the tower.
    precomputed = _losses(config, models, trained, {"vae": params["vae"]},
                                  {**batch, "context": np.asarray(context)})
    print("loss curve, ids encoded:", encoded, "context precomputed:", precomputed)
    assert np.all(np.diff(encoded) != 0)  # real steps
    np.testing.assert_allclose(precomputed, encoded, rtol=1e-6, atol=1e-6)


def test_a_trained_text_tower_encodes_the_ids_whatever_the_batch_holds(sd):
    config, models, params, batch = sd
    loss_fn = losses.diffusion_loss_fn(models, Schedule.from_config(config.schedule.to_dict()))
    trained = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    rng = jax.random.key(1)
    wrong = np.zeros((4, 16, 32), np.float32)  # a stale precomputed context
    without, _ = loss_fn(trained, {"vae": params["vae"]}, batch, rng)
    with_stale, _ = loss_fn(trained, {"vae": params["vae"]}, {**batch, "context": wrong}, rng)
    assert float(with_stale) == float(without)
    frozen_stale, _ = loss_fn({"unet": params["unet"]}, {"vae": params["vae"]},
                              {**batch, "context": wrong}, rng)
    assert float(frozen_stale) != float(without)  # ... and a frozen one reads it


# ----------------------------------------------------------------------------- two text towers

TWO_TOWERS = system.System(
    denoiser=system.Tower("unet", "unet"), vae=system.Tower("vae", "vae"),
    text_towers=(system.TextTower("text_encoder", "clip_text"),
                 system.TextTower("text_encoder_2", "clip_text", tokenizer="tokenizer_2",
                                  ids_key="input_ids_2")))


def two_tower_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.tokenizer.max_length = 16
    config.text_encoder_2 = config.text_encoder.to_dict()
    config.text_encoder_2.update(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                 num_hidden_layers=2)
    config.tokenizer_2 = config.tokenizer.to_dict()
    config.tokenizer_2.pad_token = "!"  # another padding, so the two ids rows differ
    config.unet.cross_attention_dim = 32 + 48  # the towers' contexts joined on the feature axis
    return config


def test_two_text_towers_get_both_ids_and_the_loss_traces(tmp_path):
    config = two_tower_config()
    inputs = system.text_inputs(TWO_TOWERS, config)
    assert inputs.keys == ("input_ids", "input_ids_2")
    data = input_pipeline.default_data_config()
    data.update(batch_size=4, image_size=16, caption_dropout=0.5)
    batch = next(input_pipeline.make_train_iterator(data, inputs))
    assert sorted(batch) == ["image", "input_ids", "input_ids_2", "label"]
    assert batch["input_ids"].shape == batch["input_ids_2"].shape == (4, 16)
    assert not np.array_equal(batch["input_ids"], batch["input_ids_2"])
    for key in inputs.keys:  # caption dropout swaps every tower's ids together
        dropped = np.all(batch[key] == inputs([""])[key], axis=1)
        np.testing.assert_array_equal(dropped, np.all(batch["input_ids"] == inputs([""])["input_ids"], axis=1))
    (eval_batch,) = input_pipeline.make_eval_batches(data, inputs, num_examples=4, batch_size=4)
    assert sorted(eval_batch) == sorted(batch)

    models = system.build(TWO_TOWERS, config)
    shapes = system.param_shapes(TWO_TOWERS, config)
    loss_fn = losses.diffusion_loss_fn(models, Schedule.from_config(config.schedule.to_dict()))
    trained = {"unet": shapes["unet"]}
    frozen = {n: shapes[n] for n in ("vae", "text_encoder", "text_encoder_2")}
    loss, aux = jax.eval_shape(loss_fn, trained, frozen, batch, jax.random.key(0))
    assert loss.shape == () and aux["mse"].shape == ()
    # and the gradients of a trained second tower reach it
    grads = jax.eval_shape(jax.grad(lambda p, f: loss_fn(p, f, batch, jax.random.key(0))[0]),
                           {"unet": shapes["unet"], "text_encoder_2": shapes["text_encoder_2"]},
                           {n: shapes[n] for n in ("vae", "text_encoder")})
    assert set(grads) == {"unet", "text_encoder_2"}


def test_latents_written_for_one_tower_are_refused_for_two(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text(f"picture {'abcdef'[i]}")
    fake_encode = lambda images: images[:, ::8, ::8, :].repeat(2, axis=-1)[..., :4]
    config = two_tower_config()
    inputs = system.text_inputs(TWO_TOWERS, config)
    data = input_pipeline.default_data_config()
    data.update(source="folder", path=str(tmp_path / "images"), eval_fraction=0.3, batch_size=2)
    one = inputs.tokenizers["input_ids"]
    precompute.write_latents(fake_encode, None, data, one, tmp_path / "latents")
    latents = input_pipeline.default_data_config()
    latents.update(source="latents", path=str(tmp_path / "latents"), batch_size=2)
    assert sorted(next(input_pipeline.make_train_iterator(latents, one))) == ["input_ids", "label", "latents"]
    with pytest.raises(ValueError, match="holds no input_ids_2"):
        input_pipeline.make_train_iterator(latents, inputs)
    with pytest.raises(ValueError, match="holds input_ids of length 16, the tokenizer makes 8"):
        input_pipeline.make_train_iterator(latents, system.TextInputs({"input_ids": type(one).bundled(max_length=8)}))


# ----------------------------------------------------------------------------- SDXL, precomputed


def _random_params(described, config, names):
    """Random weights from the shapes: no init's per-op compiles (a minute here)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: np.float32(0.1) * rng.standard_normal(s.shape, np.float32),
                        system.param_shapes(described, config, names))


def test_sdxl_latents_hold_both_towers_pooled_and_sizes_and_train_as_recomputed(tmp_path):
    """Two text towers precomputed: the joined context, bigG's pooled embedding, each image's
    size and crop; the loss on those equals the loss on the towers' own outputs, and caption
    dropout swaps the empty caption's context and pooled in together."""
    from PIL import Image

    from diffusion_jax.config_files import load
    from diffusion_jax.data import frozen_towers

    (tmp_path / "images").mkdir()
    for i in range(8):  # 40x36: resized to 36x32, cropped at the centre (2 columns in)
        pixels = np.random.default_rng(i).integers(0, 256, (36, 40, 3), np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text(f"a photo of {'abcdefgh'[i]}")
    config = load("tiny_sdxl_train")
    config.data.update(source="folder", path=str(tmp_path / "images"), eval_fraction=0.25,
                       batch_size=4)
    described = system.from_config(config)
    params = _random_params(described, config, ("vae", "text_encoder", "text_encoder_2"))
    encode, cond_fn = frozen_towers.frozen_encoders(config, params)
    text, time_ids = frozen_towers.text_inputs(config), frozen_towers.time_ids(config)
    meta = precompute.write_latents(encode, cond_fn, config.data, text, tmp_path / "latents",
                                    time_ids=time_ids)
    assert meta["cond_keys"] == ["context", "pooled"] and meta["micro_conditioning"]
    assert meta["max_lengths"] == {"input_ids": 16, "input_ids_2": 16}

    latents = input_pipeline.default_data_config()
    latents.update(source="latents", path=str(tmp_path / "latents"), batch_size=4,
                   image_size=32, caption_dropout=0.5)
    it = input_pipeline.make_train_iterator(latents, text, time_ids=time_ids)
    batch = next(it)
    assert batch["context"].shape == (4, 16, 48) and batch["pooled"].shape == (4, 16)
    np.testing.assert_array_equal(batch["time_ids"], np.tile([36, 40, 0, 2, 32, 32], (4, 1)))
    rows = [b for b in (batch, *(next(it) for _ in range(5)))]
    ids = np.concatenate([b["input_ids_2"] for b in rows])
    pooled = np.concatenate([b["pooled"] for b in rows])
    dropped = np.all(ids == text([""])["input_ids_2"], axis=1)
    assert 0 < dropped.sum() < len(dropped)
    null = cond_fn(text([""]))
    np.testing.assert_allclose(pooled[dropped], np.broadcast_to(null["pooled"], pooled[dropped].shape))

    models = system.build(described, config)
    loss_fn = jax.jit(losses.diffusion_loss_fn(models, Schedule.from_config(config.schedule.to_dict())))
    unet = {"unet": _random_params(described, config, ("unet",))["unet"]}
    precomputed = float(loss_fn(unet, params, batch, jax.random.key(0))[0])
    recomputed = float(loss_fn(unet, params, {k: v for k, v in batch.items()
                                              if k not in ("context", "pooled")},
                               jax.random.key(0))[0])
    assert np.isfinite(precomputed) and precomputed == pytest.approx(recomputed, rel=1e-5)

    precompute.write_latents(encode, cond_fn, config.data, text, tmp_path / "no_sizes")
    latents.path = str(tmp_path / "no_sizes")
    with pytest.raises(ValueError, match="holds no image sizes and crops"):
        input_pipeline.make_train_iterator(latents, text, time_ids=time_ids)


# ----------------------------------------------------------------------------- flow systems


@pytest.mark.parametrize("name", ["tiny_flux_train", "tiny_sd3_train"])
def test_a_flow_systems_precomputed_t5_context_and_pooled_give_the_recomputed_losses(
        name, tmp_path):
    """Flux (CLIP pooled, T5 context) and SD3 (both CLIPs' tokens then T5's, pooled CLIPs):
    the conditioning precompute stores trains the transformer as the towers would, and the
    dry run's batch holds it at the shapes the towers give."""
    import json

    from diffusion_jax import config_files
    from diffusion_jax.diffusion import process
    from diffusion_jax.training import preflight, trainer
    from test_preflight import _t5_section

    config = config_files.load(name)
    for tower in system.from_config(config).text_towers:
        if tower.kind == "t5":
            config[tower.tokenizer] = _t5_section(config[tower.tokenizer].max_length)
    sections = trainer.model_config(config)
    described = system.from_config(sections)
    models = system.build(described, sections)
    params = system.init_params(described, sections, seed=0)
    ids = system.text_inputs(described, sections)(CAPTIONS)
    channels = sections["vae"]["latent_channels"]
    latents = np.random.default_rng(0).standard_normal((4, 8, 8, channels)).astype(np.float32)
    batch = {"latents": latents, **ids}
    loss_fn = losses.diffusion_loss_fn(models, process.from_config(sections["schedule"]))
    denoiser = described.denoiser.name
    trained = {denoiser: params[denoiser]}
    towers = {n: p for n, p in params.items() if n != denoiser}
    encoded = _curve(loss_fn, trained, towers, batch)
    cond = {k: np.asarray(v) for k, v in system.encode_text(models, params, ids).items()}
    assert set(cond) == {"context", "pooled"}
    precomputed = _curve(loss_fn, trained, {"vae": params["vae"]}, {**batch, **cond})
    print(name, "loss curve, ids encoded:", encoded, "precomputed:", precomputed)
    assert np.all(np.diff(encoded) != 0)
    np.testing.assert_allclose(precomputed, encoded, rtol=1e-6, atol=1e-6)

    (tmp_path / "latents.json").write_text(json.dumps({"cond_keys": ["context", "pooled"]}))
    config.data.update(dict(source="latents", path=str(tmp_path), batch_size=4))
    shapes = preflight.batch_shapes(config, "diffusion")
    assert shapes["context"].shape == cond["context"].shape
    assert shapes["pooled"].shape == cond["pooled"].shape


def _curve(loss_fn, trained, frozen, batch, steps=3):
    optimizer = optax.adam(1e-3)
    step = jax.jit(make_train_step(loss_fn, optimizer, lambda _: 1e-3, ema_max_decay=None))
    state = TrainState.create(trained, optimizer, jax.random.key_data(jax.random.key(0)),
                              use_ema=False)
    curve = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        curve.append(float(metrics["loss"]))
    return np.asarray(curve)

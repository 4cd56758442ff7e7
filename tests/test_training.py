"""Training pieces against references (diffusers' min-SNR and EMA formulas, optax), the
jitted step's NaN guard, config overrides; and whole runs of configs/tiny_train.py: exact
resume after SIGKILL, a NaN that stops the run with the last checkpoint intact, and the
same loss curve on 1 and 8 devices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import checkpoint, system
from diffusion_jax.config_files import load as load_config_file
from diffusion_jax.config_overrides import apply_overrides, split_overrides
from diffusion_jax.diffusion.schedule import Schedule
from diffusion_jax.training import losses, partition, trainer
from diffusion_jax.training.optimizer import learning_rate_schedule, make_optimizer
from diffusion_jax.training.state import TrainState, ema_decay, make_train_step

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_train.py"
TINY_SDXL = REPO / "configs" / "tiny_sdxl_train.py"  # two text towers, pooled, time_ids
TINY_FLOW = REPO / "configs" / "tiny_flow_train.py"  # a rectified-flow MMDiT for the U-Net
# The tests that share the uninterrupted tiny SDXL run go to one pytest-xdist worker
# (pytest.ini: --dist loadgroup), so the run is made once, not once per worker.
SDXL_RUN_GROUP = pytest.mark.xdist_group("tiny_sdxl_run")
FLOW_RUN_GROUP = pytest.mark.xdist_group("tiny_flow_run")
TINY_FLUX = REPO / "configs" / "tiny_flux_train.py"  # a Flux.1-shaped transformer, CLIP + T5
FLUX_RUN_GROUP = pytest.mark.xdist_group("tiny_flux_run")
TINY_SD3 = REPO / "configs" / "tiny_sd3_train.py"  # an SD3-shaped MMDiT, two CLIPs + T5
SD3_RUN_GROUP = pytest.mark.xdist_group("tiny_sd3_run")
# The tiny SDXL runs train as SDXL fine-tunes do: on a caption folder of tall and wide images
# in aspect buckets (one compile per bucket, time_ids from each image's size and crop), so
# resume and the 8-device curve are checked across bucket switches. {folder}: aspect_folder.
SDXL_BUCKETED = ("--config.data.source=folder", "--config.data.path={folder}",
                 "--config.data.eval_fraction=0.4", "--config.data.random_crop=true",
                 "--config.data.buckets.sizes=((40, 24), (24, 40))", "--config.eval_examples=8",
                 "--config.data.seed=5")  # its 4 U-Net batches: tall, tall, wide, tall
# The flow transformers fine-tune as the real configs do, in the same buckets; their T5
# tokenizer (no T5 vocabulary ships) and every tower come from init_from: {flux_base} and
# {sd3_base}, the fixtures of those names.
FLUX_FROM_BASE = ("--config.init_from={flux_base}", *SDXL_BUCKETED)
SD3_FROM_BASE = ("--config.init_from={sd3_base}", *SDXL_BUCKETED)
BASES = ("flux_base", "sd3_base")


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_matches_diffusers(prediction_type):
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012, prediction_type=prediction_type)
    reference = DDPMScheduler(**config)
    t = np.array([0, 1, 10, 250, 500, 999])
    snr = compute_snr(reference, torch.from_numpy(t))
    # diffusers' examples/text_to_image/train_text_to_image.py weighting, gamma = 5
    weight = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weight = weight / snr if prediction_type == "epsilon" else weight / (snr + 1)
    ours = losses.min_snr_weight(Schedule.from_config(config).snr[t], 5.0, prediction_type)
    np.testing.assert_allclose(np.asarray(ours), weight.numpy(), rtol=2e-5)


def test_ema_decay_matches_diffusers_ema_model():
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999)
    for step in (1, 2, 3, 10, 100, 5000):
        assert float(ema_decay(jnp.asarray(step), 0.999)) == pytest.approx(ema.get_decay(step), rel=1e-6)


def test_learning_rate_warmup_then_cosine():
    schedule = learning_rate_schedule({"learning_rate": 1e-3, "warmup_steps": 10,
                                       "lr_schedule": "cosine"}, 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4, rel=1e-4)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-9)
    constant = learning_rate_schedule({"learning_rate": 1e-3, "warmup_steps": 10,
                                       "lr_schedule": "constant"}, 110)
    assert float(constant(5)) == pytest.approx(5e-4) and float(constant(100)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_schedule({"learning_rate": 1.0, "lr_schedule": "step"}, 10)


# ----------------------------------------------------------------------------- the step


def _quadratic_loss(params, frozen, batch, rng):
    del frozen, rng
    residual = batch["x"] @ params["w"] - batch["y"]
    loss = jnp.mean(residual ** 2) * batch["scale"][0]
    return loss, {}


def _step(accumulation=1, ema=0.9):
    cfg = {"learning_rate": 0.1, "warmup_steps": 0, "lr_schedule": "constant",
           "grad_clip_norm": 0.0, "gradient_accumulation": accumulation}
    optimizer, lr = make_optimizer(cfg, 100)
    step = jax.jit(make_train_step(_quadratic_loss, optimizer, lr, ema_max_decay=ema,
                                   gradient_accumulation=accumulation))
    return optimizer, step


def _batch(rng, n, scale=1.0):
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5], np.float32),
            "scale": np.full((n,), scale, np.float32)}


def test_gradient_accumulation_equals_the_large_batch_step():
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((3,))}
    big = _batch(rng, 8)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]

    optimizer, step = _step()
    one, _ = step(TrainState.create(params, optimizer, jax.random.key_data(jax.random.key(0))), {}, big)
    optimizer, step = _step(accumulation=2)
    state = TrainState.create(params, optimizer, jax.random.key_data(jax.random.key(0)))
    state, _ = step(state, {}, halves[0])
    np.testing.assert_array_equal(state.params["w"], 0.0)  # no update mid-accumulation
    np.testing.assert_array_equal(state.ema_params["w"], 0.0)
    state, _ = step(state, {}, halves[1])
    np.testing.assert_allclose(state.params["w"], one.params["w"], rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], one.ema_params["w"], rtol=1e-6)
    assert np.abs(np.asarray(one.params["w"])).min() > 0


def test_nonfinite_loss_keeps_the_last_good_params_and_names_the_step():
    rng = np.random.default_rng(0)
    optimizer, step = _step()
    state = TrainState.create({"w": jnp.zeros((3,))}, optimizer, jax.random.key_data(jax.random.key(0)))
    state, _ = step(state, {}, _batch(rng, 4))
    good = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema_params))
    state, metrics = step(state, {}, _batch(rng, 4, scale=np.nan))
    assert not np.isfinite(metrics["loss"]) and int(state.nonfinite_step) == 1
    jax.tree.map(np.testing.assert_array_equal,
                 (state.params, state.opt_state, state.ema_params), good)
    state, _ = step(state, {}, _batch(rng, 4, scale=np.inf))
    state, _ = step(state, {}, _batch(rng, 4))  # a later finite step does not hide it
    assert int(state.nonfinite_step) == 1 and int(state.step) == 4
    assert np.all(np.asarray(state.params["w"]) != good[0]["w"])


# ----------------------------------------------------------------------------- param rules


def _tree():
    return {"unet": {"conv_in": {"kernel": np.ones(2), "bias": np.zeros(2)},
                     "attn": {"lora_up": np.full(2, 3.0)}},
            "vae": {"decoder": {"kernel": np.ones(3)}}}


def test_rules_split_the_params_tree_and_combine_puts_it_back():
    tree = _tree()
    trained, frozen = partition.split(tree, (r"unet/.*",))
    assert trained.keys() == {"unet"} and frozen.keys() == {"vae"}
    assert jax.tree.structure(trained["unet"]) == jax.tree.structure(tree["unet"])  # whole tower
    lora, rest = partition.split(tree, (r"unet/.*lora.*",))
    assert partition.paths(lora) == ["unet/attn/lora_up"]
    assert sorted(partition.paths(rest)) == ["unet/conv_in/bias", "unet/conv_in/kernel",
                                             "vae/decoder/kernel"]
    jax.tree.map(np.testing.assert_array_equal, partition.combine(rest, lora), tree)
    assert partition.select(tree, (r"unet/.*",), (r".*bias",)) == {
        "unet": {"conv_in": {"bias": tree["unet"]["conv_in"]["bias"]}}}
    assert partition.unmatched((r"unet/.*", r"unett/.*"), partition.paths(tree)) == [r"unett/.*"]


def test_ema_of_a_part_of_the_trained_params():
    optimizer, _ = make_optimizer({"learning_rate": 0.1, "warmup_steps": 0,
                                   "lr_schedule": "constant"}, 100)
    select = lambda params: partition.select(params, (r"w",))
    loss = lambda params, frozen, batch, rng: (_quadratic_loss(params, frozen, batch, rng)[0]
                                               + jnp.sum(params["b"] ** 2), {})
    step = jax.jit(make_train_step(loss, optimizer, lambda s: 0.1, ema_max_decay=0.9,
                                   ema_select=select))
    state = TrainState.create({"w": jnp.zeros((3,)), "b": jnp.ones(())}, optimizer,
                              jax.random.key_data(jax.random.key(0)), ema_select=select)
    assert state.ema_params.keys() == {"w"}
    state, _ = step(state, {}, _batch(np.random.default_rng(0), 4))
    np.testing.assert_array_equal(state.ema_params["w"], state.params["w"])  # decay 0 at step 1


@pytest.mark.parametrize("overrides, trained, ema", [
    ({}, ["unet"], ["unet"]),
    ({"train_text_encoder": True}, ["text_encoder", "unet"], ["text_encoder", "unet"]),
    ({"trainable": (r"unet/.*attentions.*",), "ema": (r".*to_q.*",)}, ["unet"], ["unet"]),
])
def test_stage_program_trains_what_the_rules_match(overrides, trained, ema):
    from diffusion_jax import parallel
    from diffusion_jax.training import preflight

    config = load_config_file(TINY)
    config.training.update(overrides)
    ckpt_config = trainer.model_config(config)
    towers = preflight.abstract_towers(ckpt_config)
    program = trainer.stage_program(config, ckpt_config, parallel.make_mesh(config.mesh),
                                    "diffusion", towers)
    assert sorted(program.trained) == trained and sorted(program.state_shapes.ema_params) == ema
    rules = trainer.DIFFUSION.trainable(config)
    every = partition.paths(towers)
    assert sorted(partition.paths(program.trained)) == sorted(
        p for p in every if partition.matcher(rules)(p))
    assert sorted(partition.paths(program.frozen) + partition.paths(program.trained)) == sorted(every)
    if "ema" in overrides:
        assert all("to_q" in p for p in partition.paths(program.state_shapes.ema_params))
        assert all("attentions" in p for p in partition.paths(program.trained))
        assert program.frozen["unet"]  # the U-Net's other params stay frozen


def test_evaluators_come_from_config_final_eval():
    from diffusion_jax.training import evaluators

    config = load_config_file(TINY)
    assert evaluators.from_config(config) == []
    config.final_eval.update(dict(samples_per_class=3, fid_samples=20, fid_reference_examples=50,
                                  clip_score_samples=6, clip_model="clip"))
    prompts = tuple(config.sample.prompts)
    assert evaluators.from_config(config) == [
        evaluators.FashionMnistClassAccuracy(3),
        evaluators.Fid(20, "fashion_mnist", 50, 32, prompts),
        evaluators.ClipScore(6, "clip", prompts)]
    assert evaluators.metrics_of(evaluators.from_config(config)) == {
        "class_accuracy", "fid", "kid", "clip_score"}


def tiny_clip_folder(folder: Path) -> Path:
    """A random-weight transformers CLIPModel folder (the bundled CLIP vocabulary)."""
    import transformers

    from diffusion_jax.tokenizer import CLIPTokenizer

    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    import torch

    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    with torch.no_grad():  # a direction both towers share, so the scores are positive
        for norm, projection in ((model.vision_model.post_layernorm, model.visual_projection),
                                 (model.text_model.final_layer_norm, model.text_projection)):
            norm.bias.add_(0.5)
            projection.weight[0] += 0.1
    model.save_pretrained(folder)
    CLIPTokenizer.bundled().save_pretrained(folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides, message", [
    (dict(checkpoint=dict(best_metric="fid")), "does not run during training"),
    (dict(checkpoint=dict(best_metric="sharpness")), "use one of"),
    (dict(final_eval=dict(clip_score_samples=4, clip_model="/nonexistent/clip")),
     "final_eval.clip_model='/nonexistent/clip'"),
    (dict(final_eval=dict(fid_samples=4, fid_reference="/nonexistent/ref")),
     "final_eval.fid_reference='/nonexistent/ref'"),
    (dict(final_eval=dict(every_steps=3)), "multiple of checkpoint.every_steps=4"),
])
def test_evaluation_settings_are_checked_before_training(overrides, message):
    from diffusion_jax.training import preflight

    config = load_config_file(TINY)
    for section, values in overrides.items():
        config[section].update(values)
    with pytest.raises(ValueError, match=message) as info:
        preflight.check_config(config)
    assert "\n" not in str(info.value)


def test_evaluators_run_during_training_and_rank_the_best_checkpoint(finished_run,
                                                                    tmp_path_factory):
    """final_eval.every_steps=4: CLIP score at U-Net steps 4 and 8 (global 10, 14), logged to
    metrics.jsonl and TensorBoard; the final summary reuses the last step's; the kept
    checkpoints are the latest and the best by clip_score."""
    clip = tiny_clip_folder(tmp_path_factory.mktemp("clip"))
    workdir = finished_run("--config.final_eval.clip_score_samples=4",
                           f"--config.final_eval.clip_model={clip}",
                           "--config.final_eval.every_steps=4",
                           "--config.checkpoint.best_metric=clip_score", "--config.checkpoint.keep=1")
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scores = {c["step"]: c["clip_score"] for c in curve if "clip_score" in c}
    assert sorted(scores) == [10, 14] and all(c["stage"] == "diffusion" for c in curve
                                              if "clip_score" in c)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["clip_score"] == scores[14] and summary["clip_score_samples"] == 4
    assert _tensorboard_tags(workdir).count("eval/clip_score") == 2
    assert all(s > 0 for s in scores.values()) and scores[10] != scores[14]
    best = max(scores, key=scores.get)
    assert checkpoint.steps(workdir / "checkpoints") == sorted({14, best})


# ----------------------------------------------------------------------------- config


def _config():
    config = ml_collections.ConfigDict()
    config.training = dict(steps=10, learning_rate=1e-3, train_text_encoder=False)
    config.unet = dict(block_out_channels=(32, 64))
    config.dtype = "float32"
    return config


def test_overrides_parse_by_the_field_type():
    config = apply_overrides(_config(), [("training.steps", "20"), ("training.learning_rate", "3e-4"),
                                         ("training.train_text_encoder", "true"),
                                         ("unet.block_out_channels", "(8, 16, 16)"),
                                         ("dtype", "bfloat16"), ("training.learning_rate", "1")])
    assert config.training.steps == 20 and config.training.learning_rate == 1.0
    assert config.training.train_text_encoder is True
    assert config.unet.block_out_channels == (8, 16, 16) and config.dtype == "bfloat16"


@pytest.mark.parametrize("override, message", [
    (("training.step", "5"), r"no key `training.step`; did you mean training.steps"),
    (("trainig.steps", "5"), r"no key `trainig.steps`"),
    (("training.steps", "many"), r"training.steps=many: expected a int"),
    (("training.steps", "2.5"), r"training.steps=2.5: expected a int"),
    (("training.train_text_encoder", "maybe"), r"expected true or false"),
    (("training", "5"), r"is a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(_config(), [override])


def test_split_overrides():
    rest, overrides = split_overrides(["train", "--config.a=1", "--workdir", "w", "--config.b", "x y"])
    assert rest == ["train", "--workdir", "w"] and overrides == [("a", "1"), ("b", "x y")]


def test_cli_rejects_an_unknown_key_before_training(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffusion_jax.cli", "train", "--config", str(TINY),
                             "--workdir", str(tmp_path / "w"), "--config.training.stepz=3"],
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 1
    assert "training.stepz" in result.stderr and "training.steps" in result.stderr
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- whole runs


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _train_command(workdir, *overrides, config=TINY):
    return [sys.executable, "-m", "diffusion_jax.cli", "train", "--config", str(config),
            "--workdir", str(workdir), *overrides]


@pytest.fixture(scope="module")
def aspect_folder(tmp_path_factory) -> Path:
    """32 captioned images, half tall (60x36) and half wide (36x60), 11 of them held out."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tall_and_wide")
    rng = np.random.default_rng(0)
    for i in range(32):
        height, width = (60, 36) if i % 2 else (36, 60)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(
            root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {'tall' if i % 2 else 'wide'} picture {i}")
    return root


def _in_folder(overrides, folder, request=None) -> tuple:
    """The overrides with {folder} (aspect_folder) and {flux_base} / {sd3_base} (those
    fixtures, made only where one asks for them) filled in."""
    bases = {name: request.getfixturevalue(name) if request and any(
        f"{{{name}}}" in o for o in overrides) else None for name in BASES}
    return tuple(o.format(folder=folder, **bases) for o in overrides)


def t5_base(config_path: Path, root: Path) -> Path:
    """A checkpoint of a T5 system's training config's architecture, random weights, with a
    small T5 Unigram tokenizer trained here (test_t5.unigram_vocab) as its T5 tokenizer."""
    import transformers

    from diffusion_jax import system
    from diffusion_jax.tokenizer import T5Tokenizer
    from test_t5 import unigram_vocab

    transformers.T5Tokenizer(vocab=unigram_vocab(), extra_ids=10).save_pretrained(root / "t5")
    transformers.AutoTokenizer.from_pretrained(root / "t5").save_pretrained(root / "t5")
    sections = system.checkpoint_config(load_config_file(config_path))
    towers = system.from_config(sections)
    for tower in towers.text_towers:
        if tower.kind == "t5":
            sections[tower.tokenizer] = T5Tokenizer.from_pretrained(
                root / "t5", max_length=sections[tower.tokenizer]["max_length"]).to_section()
    checkpoint.create(root / "ckpt", system.init_params(towers, sections, seed=3), sections)
    return root / "ckpt"


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory) -> Path:
    """A checkpoint of configs/tiny_flux_train.py's architecture (see t5_base)."""
    return t5_base(TINY_FLUX, tmp_path_factory.mktemp("flux_base"))


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory) -> Path:
    """A checkpoint of configs/tiny_sd3_train.py's architecture (see t5_base)."""
    return t5_base(TINY_SD3, tmp_path_factory.mktemp("sd3_base"))


def _final_params(workdir, names=("unet", "unet_ema", "vae", "optimizer")):
    items, _ = checkpoint.load(Path(workdir) / "checkpoints", items=list(names))
    return items


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """overrides (and config) -> the workdir of one uninterrupted run with them (each run
    once)."""
    runs = {}

    def run(*overrides, config=TINY):
        if (config, overrides) not in runs:
            workdir = tmp_path_factory.mktemp("uninterrupted")
            result = subprocess.run(_train_command(workdir, *overrides, config=config),
                                    capture_output=True, text=True, cwd=REPO, env=_env())
            assert result.returncode == 0, result.stderr[-3000:]
            runs[config, overrides] = workdir
        return runs[config, overrides]

    return run


@pytest.fixture(scope="module")
def uninterrupted(finished_run):
    return finished_run()


TEXT_ENCODER_RUN = ("--config.training.train_text_encoder=true",)


def test_run_writes_checkpoints_samples_and_summary(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["vae_scaling_factor"] > 0
    # One compile per stage: every step of a stage has the same shapes and shardings.
    assert summary["vae_train_step_compilations"] == 1
    assert summary["diffusion_train_step_compilations"] == 1
    steps = checkpoint.steps(uninterrupted / "checkpoints")
    assert steps[-1] == 14  # 6 VAE + 8 U-Net steps
    names = checkpoint.item_names(uninterrupted / "checkpoints")
    assert {"unet", "unet_ema", "vae", "text_encoder", "optimizer", "trainer"} <= set(names)
    from PIL import Image

    grid = Image.open(summary["samples"])
    assert grid.size == (2 * 32, 2 * 32) and grid.text["sampler"] == "dpmpp_2m"
    curve = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    train_lines = [c for c in curve if "loss" in c]
    assert [c["step"] for c in train_lines] == [2, 4, 6, 8, 10, 12, 14]
    assert all(c["step_images_per_second"] >= c["images_per_second"] for c in train_lines)
    # Held-out losses every 4 steps of a stage and at each stage's end, beside the curve.
    assert [(c["stage"], c["step"]) for c in curve if "eval_loss" in c] == [
        ("vae", 4), ("vae", 6), ("diffusion", 10), ("diffusion", 14)]
    assert summary["diffusion_step_images_per_second"] >= summary["diffusion_images_per_second"] > 0
    assert list((uninterrupted / "tensorboard").iterdir())
    from diffusion_jax import pipeline

    pipe = pipeline.load(uninterrupted / "checkpoints", cache_dir=None)  # a usual checkpoint
    assert pipe.vae_config.scaling_factor == summary["vae_scaling_factor"]


@pytest.mark.parametrize("config, overrides, items, checkpoints", [
    (TINY, (), ("unet", "unet_ema", "vae", "optimizer"), (4, 8, 12)),
    (TINY, TEXT_ENCODER_RUN, ("unet", "unet_ema", "vae", "text_encoder", "text_encoder_ema",
                              "optimizer"), (4, 8, 12)),
    pytest.param(TINY_SDXL, SDXL_BUCKETED, ("unet", "unet_ema", "vae", "optimizer"), (2, 4),
                 marks=SDXL_RUN_GROUP),
    pytest.param(TINY_FLOW, (), ("transformer", "transformer_ema", "vae", "optimizer"), (2, 4),
                 marks=FLOW_RUN_GROUP),
    pytest.param(TINY_FLUX, FLUX_FROM_BASE, ("transformer", "transformer_ema", "optimizer"),
                 (2, 4), marks=FLUX_RUN_GROUP),
    pytest.param(TINY_SD3, SD3_FROM_BASE, ("transformer", "transformer_ema", "optimizer"),
                 (2, 4), marks=SD3_RUN_GROUP),
], ids=["unet", "text_encoder", "sdxl", "flow", "flux", "sd3"])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(
        finished_run, aspect_folder, tmp_path, request, config, overrides, items, checkpoints):
    overrides = _in_folder(overrides, aspect_folder, request)
    uninterrupted = finished_run(*overrides, config=config)
    workdir = tmp_path / "killed"
    kill_after = int(np.random.default_rng().choice(checkpoints))  # a checkpoint in either stage
    process = subprocess.Popen(_train_command(workdir, *overrides, config=config), cwd=REPO,
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        ckpts = workdir / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= kill_after for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(_train_command(workdir, *overrides, config=config),
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    expected, resumed = _final_params(uninterrupted, items), _final_params(workdir, items)
    jax.tree.map(np.testing.assert_array_equal, resumed, expected)


@SDXL_RUN_GROUP
def test_an_sdxl_shaped_run_trains_on_pooled_and_time_ids_and_checkpoints(finished_run,
                                                                          aspect_folder):
    """configs/tiny_sdxl_train.py on a caption folder in two aspect buckets: two text towers,
    the pooled bigG-like embedding and the size/crop time_ids the data pipeline builds; the
    final grid is sampled through the pipeline from the run's EMA params (its time_ids from
    the grid's size)."""
    workdir = finished_run(*_in_folder(SDXL_BUCKETED, aspect_folder), config=TINY_SDXL)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["diffusion_train_step_compilations"] == 2  # per bucket: both were drawn
    assert Path(summary["samples"]).is_file()
    assert np.isfinite(summary["diffusion_eval_loss"])
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(c["loss"]) for c in curve if "loss" in c)
    assert checkpoint.steps(workdir / "checkpoints")[-1] == 6  # 2 VAE + 4 U-Net steps
    names = checkpoint.item_names(workdir / "checkpoints")
    assert {"unet", "unet_ema", "vae", "text_encoder", "text_encoder_2"} <= set(names)
    from diffusion_jax import system

    saved = checkpoint.read_config(workdir / "checkpoints")
    assert system.from_config(saved) == system.SDXL_BASE and saved["pipeline"]


def test_the_loss_feeds_the_batch_time_ids_and_pooled_to_the_unet():
    """A change of time_ids (or of the second tower's ids, hence pooled) changes the loss at
    fixed noise: both reach the U-Net's micro-conditioning."""
    from diffusion_jax import system
    from diffusion_jax.diffusion import process

    config = load_config_file(TINY_SDXL)
    ckpt_config = trainer.model_config(config)
    rng = np.random.default_rng(0)  # random weights without init's per-op compiles (~1 min)
    towers = jax.tree.map(lambda s: np.float32(0.1) * rng.standard_normal(s.shape, np.float32),
                          system.param_shapes(system.SDXL_BASE, ckpt_config))
    models = system.build(system.SDXL_BASE, ckpt_config)
    loss_fn = jax.jit(losses.diffusion_loss_fn(models, process.from_config(ckpt_config["schedule"])))
    ids = system.text_inputs(system.SDXL_BASE, ckpt_config)(["a photo of a bag"] * 2)
    batch = {"latents": np.zeros((2, 8, 8, 4), np.float32), **ids,
             "time_ids": np.float32([[28, 28, 0, 0, 32, 32]] * 2)}
    trained, frozen = partition.split(towers, (r"unet/.*",))
    loss = lambda b: float(loss_fn(trained, frozen, b, jax.random.key(0))[0])
    base = loss(batch)
    assert np.isfinite(base)
    assert loss({**batch, "time_ids": np.float32([[1024, 768, 64, 0, 32, 32]] * 2)}) != base
    other = system.text_inputs(system.SDXL_BASE, ckpt_config)(["a coat"] * 2)["input_ids_2"]
    assert loss({**batch, "input_ids_2": other}) != base
    with pytest.raises(KeyError, match="time_ids"):
        loss({k: v for k, v in batch.items() if k != "time_ids"})


def test_every_tower_trained_with_ema_saves_and_samples_with_it(finished_run):
    workdir = finished_run(*TEXT_ENCODER_RUN)
    names = checkpoint.item_names(workdir / "checkpoints")
    assert {"unet_ema", "text_encoder_ema"} <= set(names) and "vae_ema" not in names
    items = _final_params(workdir, ("text_encoder", "text_encoder_ema"))
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(items["text_encoder"]), jax.tree.leaves(items["text_encoder_ema"])))
    params, _, _ = checkpoint.load_models(workdir / "checkpoints")  # what `sample` reads
    jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], items["text_encoder_ema"])


def test_sigterm_writes_a_checkpoint_and_exits_for_resume(tmp_path):
    workdir = tmp_path / "terminated"
    process = subprocess.Popen(_train_command(workdir, "--config.training.steps=400"), cwd=REPO,
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-2000:]
    assert "rerun the same command to resume" in stderr
    from diffusion_jax import pipeline

    assert checkpoint.steps(workdir / "checkpoints")
    pipeline.load(workdir / "checkpoints", cache_dir=None)  # the stop left a usable checkpoint


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path, monkeypatch):
    workdir = tmp_path / "nan"
    config = load_config_file(TINY)
    config.training.steps = 0
    config.final_eval.samples_per_class = 0
    trainer.train(config, workdir)  # the VAE stage: checkpoints at 4 and 6
    good = checkpoint.steps(workdir / "checkpoints")
    before = _final_params(workdir, ("unet", "vae", "optimizer"))

    real = losses.diffusion_loss_fn

    def poisoned(*args, **kwargs):
        loss_fn = real(*args, **kwargs)

        def with_nan(params, frozen, batch, rng):
            loss, aux = loss_fn(params, frozen, batch, rng)
            return loss * jnp.nan, aux
        return with_nan

    monkeypatch.setattr(losses, "diffusion_loss_fn", poisoned)
    config = load_config_file(TINY)
    with pytest.raises(trainer.TrainingDiverged, match=r"NaN/Inf at step 7;.*last good checkpoint \(step 6\)"):
        trainer.train(config, workdir)
    assert checkpoint.steps(workdir / "checkpoints") == good
    jax.tree.map(np.testing.assert_array_equal, _final_params(workdir, ("unet", "vae", "optimizer")),
                 before)


@pytest.mark.parametrize("config, overrides", [
    (TINY, ()), pytest.param(TINY_SDXL, SDXL_BUCKETED, marks=SDXL_RUN_GROUP),
    pytest.param(TINY_FLOW, (), marks=FLOW_RUN_GROUP),
    pytest.param(TINY_FLUX, FLUX_FROM_BASE, marks=FLUX_RUN_GROUP),
    pytest.param(TINY_SD3, SD3_FROM_BASE, marks=SD3_RUN_GROUP)],
    ids=["sd", "sdxl", "flow", "flux", "sd3"])
def test_one_and_eight_devices_give_the_same_loss_curve(finished_run, aspect_folder, tmp_path,
                                                        request, config, overrides):
    overrides = _in_folder(overrides, aspect_folder, request)
    uninterrupted = finished_run(*overrides, config=config)
    workdir = tmp_path / "eight"
    result = subprocess.run(_train_command(workdir, *overrides,
                                           "--config.mesh.data=4", "--config.mesh.fsdp=2",
                                           "--config.mesh.fsdp_min_size=64", config=config),
                            capture_output=True, text=True, cwd=REPO, env=_env(devices=8))
    assert result.returncode == 0, result.stderr[-3000:]
    curve = lambda w: [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    one, eight = curve(uninterrupted), curve(workdir)
    assert [c["step"] for c in one] == [c["step"] for c in eight]
    for a, b in zip(one, eight):
        key = "loss" if "loss" in a else "eval_loss"  # train and held-out lines alike
        assert b[key] == pytest.approx(a[key], rel=2e-4), (a, b)
    denoiser = (system.from_config(load_config_file(config)).denoiser.name,)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4),
                 _final_params(workdir, denoiser), _final_params(uninterrupted, denoiser))


def _tensorboard_tags(workdir) -> list[str]:
    """Summary tags in the run's event files (TFRecord framing around Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = []
    for path in sorted((Path(workdir) / "tensorboard").iterdir()):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags += [value.tag for value in event.summary.value]
            offset += 12 + length + 4
    return tags


def test_rerunning_a_finished_run_leaves_its_outputs(uninterrupted):
    outputs = [uninterrupted / "summary.json", *(uninterrupted / "samples").iterdir()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs}
    result = subprocess.run(_train_command(uninterrupted), capture_output=True, text=True,
                            cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is complete (step 14 of 14)" in result.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in outputs} == before
    assert checkpoint.steps(uninterrupted / "checkpoints")[-1] == 14
    assert "samples" in _tensorboard_tags(uninterrupted)  # the final grid, as an image


def test_an_extended_run_keeps_the_earlier_stages_figures(uninterrupted, tmp_path):
    import shutil

    workdir = tmp_path / "extended"
    shutil.copytree(uninterrupted, workdir)
    first = json.loads((workdir / "summary.json").read_text())
    result = subprocess.run(_train_command(workdir, "--config.training.steps=10"),
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert checkpoint.steps(workdir / "checkpoints")[-1] == 16
    vae_keys = [k for k in first if k.startswith("vae_")]
    assert vae_keys and {k: summary[k] for k in vae_keys} == {k: first[k] for k in vae_keys}
    assert summary["diffusion_eval_loss"] != first["diffusion_eval_loss"]  # trained further


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_one(uninterrupted, tmp_path):
    import shutil

    workdir = tmp_path / "partial"
    shutil.copytree(uninterrupted, workdir)
    ckpts = workdir / "checkpoints"
    # What a process killed mid-save leaves: Orbax's temporary step directory, never renamed.
    partial = ckpts / "18.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(ckpts / "14", partial)
    (partial / "unet" / "_METADATA").unlink(missing_ok=True)
    assert checkpoint.steps(ckpts)[-1] == 14
    manager = checkpoint.TrainingCheckpointer(ckpts, pytree_items=("unet",), json_items=())
    assert manager.latest_step() == 14
    manager.close()
    from diffusion_jax import pipeline

    pipeline.load(ckpts, cache_dir=None)


@FLUX_RUN_GROUP
def test_a_flux_shaped_run_fine_tunes_the_transformer_from_its_base(finished_run, flux_base,
                                                                    aspect_folder, request):
    """configs/tiny_flux_train.py from a tiny Flux checkpoint: the 2x2-packed transformer,
    CLIP's pooled output and T5's tokens (its tokenizer init_from's) through the same
    trainer, in tall and wide buckets (one compile each); the train and held-out losses go
    down and the grid samples with flow_euler."""
    from PIL import Image

    workdir = finished_run(*_in_folder(FLUX_FROM_BASE, aspect_folder, request), config=TINY_FLUX)
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [c["loss"] for c in curve if "loss" in c]
    held_out = [c["eval_loss"] for c in curve if "eval_loss" in c]
    assert len(train) == len(held_out) == 2 and train[1] < train[0] and held_out[1] < held_out[0]
    saved = checkpoint.read_config(workdir / "checkpoints")
    assert system.from_config(saved) == system.FLUX
    assert saved["tokenizer_2"]["tokenizer_json"] == checkpoint.read_config(
        flux_base)["tokenizer_2"]["tokenizer_json"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert Image.open(summary["samples"]).text["sampler"] == "flow_euler"
    assert summary["diffusion_train_step_compilations"] == 2  # the tall and the wide bucket


@FLUX_RUN_GROUP
def test_a_flux_lora_run_exports_factors_that_diffusers_applies_as_we_do(flux_base, tmp_path):
    """LoRA on the Flux transformer's attention (lora_train.TRANSFORMER_ATTENTION): only the
    factors train; `export --to peft` and diffusers' FluxPipeline.load_lora_weights on the
    base exported to diffusers give the transformer output our merged params give."""
    import torch
    diffusers = pytest.importorskip("diffusers")

    from diffusion_jax import cli
    from diffusion_jax.adapters import lora_train
    from diffusion_jax.configs.tiny_lora_train import lora_sections
    from diffusion_jax.models import flux

    config = load_config_file(TINY_FLUX)
    lora_sections(config, rank=2, alpha=4.0, targets=(lora_train.TRANSFORMER_ATTENTION,))
    config.init_from, config.training.learning_rate = str(flux_base), 1e-2
    trainer.train(config, tmp_path / "run")
    base, _ = checkpoint.load(flux_base, items=["transformer"])
    trained, _ = checkpoint.load(tmp_path / "run" / "checkpoints", items=["transformer", "lora"])
    jax.tree.map(np.testing.assert_array_equal, trained["transformer"], base["transformer"])
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--to",
                     "peft", "--out", str(tmp_path / "lora.safetensors")]) == 0
    assert cli.main(["export", "--checkpoint", str(flux_base), "--out",
                     str(tmp_path / "diffusers")]) == 0
    pipe = diffusers.FluxPipeline.from_pretrained(tmp_path / "diffusers")
    pipe.load_lora_weights(tmp_path / "lora.safetensors")
    items, ckpt_config, _ = checkpoint.load_models(tmp_path / "run" / "checkpoints")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    context = rng.standard_normal((1, 5, 32)).astype(np.float32)
    pooled = rng.standard_normal((1, 16)).astype(np.float32)
    packed, t = np.asarray(flux.pack_latents(latents)), np.float32([0.6])
    img_ids, txt_ids = flux.latent_image_ids(4, 4), np.zeros((5, 3), np.float32)
    model = system.build(system.FLUX, ckpt_config)["transformer"]
    ours = model.apply({"params": items["transformer"]}, packed, context, pooled, t, img_ids,
                       txt_ids, None)
    with torch.no_grad():
        theirs = pipe.transformer(*map(torch.from_numpy, (packed, context, pooled, t, img_ids,
                                                          txt_ids))).sample.numpy()
    lora_free = model.apply({"params": base["transformer"]}, packed, context, pooled, t, img_ids,
                            txt_ids, None)
    assert np.abs(np.asarray(ours) - np.asarray(lora_free)).max() > 1e-3  # the factors moved
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@FLUX_RUN_GROUP
def test_a_flux_run_trains_on_latents_precomputed_with_clip_and_t5(flux_base, aspect_folder,
                                                                   tmp_path):
    """`diffusion-jax precompute` of a WebDataset shard for a Flux system (the T5 tokenizer
    init_from's): each record holds the shifted and scaled 16-channel latents, T5's context
    and CLIP's pooled output at the shapes the preflight's batch gives, and a run trains on
    them."""
    from diffusion_jax.data import sources
    from diffusion_jax.training import preflight
    from test_webdataset import write_tar

    write_tar(tmp_path / "00000.tar", [(f"{p.stem}.{ext}", p.with_suffix(f".{ext}").read_bytes())
                                       for p in sorted(aspect_folder.glob("*.png"))
                                       for ext in ("png", "txt")])
    out, base = tmp_path / "latents", f"--config.init_from={flux_base}"
    result = subprocess.run([sys.executable, "-m", "diffusion_jax.cli", "precompute", "--config",
                             str(TINY_FLUX), base, "--config.data.eval_fraction=0.4",
                             "--from", "webdataset",
                             str(tmp_path / "00000.tar"), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 32 images from 1 shards" in result.stdout  # (some held out for the eval)
    assert sorted(json.loads((out / "latents.json").read_text())["cond_keys"]) == [
        "context", "pooled"]
    config = load_config_file(TINY_FLUX)
    apply_overrides(config, [("init_from", str(flux_base)), ("data.source", "latents"),
                             ("data.path", str(out))])
    shapes = preflight.batch_shapes(config, "diffusion")
    record = sources.LatentsSource(str(out), "train")[0]
    for key in ("latents", "context", "pooled"):
        assert record[key].shape == shapes[key].shape[1:], key
    workdir = tmp_path / "run"
    result = subprocess.run(_train_command(workdir, base, "--config.data.source=latents",
                                           f"--config.data.path={out}",
                                           "--config.eval_examples=8", config=TINY_FLUX),
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [c["loss"] for c in curve if "loss" in c]
    assert len(train) == 2 and np.all(np.isfinite(train))


@SD3_RUN_GROUP
def test_an_sd3_shaped_run_fine_tunes_the_transformer_from_its_base(finished_run, aspect_folder,
                                                                    request):
    """configs/tiny_sd3_train.py from a tiny SD3 checkpoint: the three text towers'
    conditioning (CLIP-L and CLIP-G features padded to T5's width, then T5's tokens; both
    pooled projections) through the same trainer, in buckets; the losses go down."""
    workdir = finished_run(*_in_folder(SD3_FROM_BASE, aspect_folder, request), config=TINY_SD3)
    curve = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [c["loss"] for c in curve if "loss" in c]
    held_out = [c["eval_loss"] for c in curve if "eval_loss" in c]
    assert len(train) == len(held_out) == 2 and train[1] < train[0] and held_out[1] < held_out[0]
    assert system.from_config(checkpoint.read_config(workdir / "checkpoints")) == system.SD3


def test_a_dev_shaped_transformer_trains_with_the_embedded_guidance():
    """Flux.1-dev takes its distilled guidance as an input: the training loss gives it
    training.embedded_guidance (diffusers' train_dreambooth_flux: --guidance_scale), and
    another value changes the loss at fixed noise."""
    from diffusion_jax.diffusion import process

    config = load_config_file(TINY_FLUX)
    config.transformer.guidance_embeds = True
    ckpt_config = trainer.model_config(config)
    rng = np.random.default_rng(0)
    towers = jax.tree.map(lambda s: np.float32(0.1) * rng.standard_normal(s.shape, np.float32),
                          system.param_shapes(system.FLUX, ckpt_config))
    models = system.build(system.FLUX, ckpt_config)
    noise = process.from_config(ckpt_config["schedule"])
    batch = {"latents": rng.standard_normal((2, 8, 8, 16)).astype(np.float32),
             "input_ids": np.zeros((2, 16), np.int32), "input_ids_2": np.zeros((2, 32), np.int32)}
    trained, frozen = partition.split(towers, (r"transformer/.*",))
    loss = lambda g: float(losses.diffusion_loss_fn(models, noise, embedded_guidance=g)(
        trained, frozen, batch, jax.random.key(0))[0])
    assert np.isfinite(loss(3.5)) and loss(3.5) != loss(1.0)
    assert config.training.embedded_guidance == 3.5  # base_training's, as diffusers' script


def test_a_t5_tower_without_a_vocabulary_is_refused_before_compiling(tmp_path, capsys):
    from diffusion_jax import cli

    config = load_config_file(TINY_FLUX)
    path = tmp_path / "ckpt"  # a checkpoint whose T5 tokenizer section has no tokenizer.json
    checkpoint.save(path, 0, {n: {"stub": np.zeros(1, np.float32)}
                              for n in system.from_config(config).names},
                    trainer.model_config(config))
    assert cli.main(["train", "--config", str(TINY_FLUX), "--workdir", str(tmp_path / "w"),
                     f"--config.init_from={path}", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "text_encoder_2 is a T5 tower, whose tokenizer comes from init_from" in err


@FLOW_RUN_GROUP
def test_a_flow_run_trains_the_transformer_and_samples_with_flow_euler(finished_run):
    """configs/tiny_flow_train.py: the rectified-flow objective on an MMDiT through the same
    trainer, checkpoints and pipeline; the final grid sampled by flow_euler."""
    workdir = finished_run(config=TINY_FLOW)
    names = checkpoint.item_names(workdir / "checkpoints")
    assert {"transformer", "transformer_ema", "vae", "text_encoder"} <= set(names)
    assert "unet" not in names
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["diffusion_train_step_compilations"] == 1
    from PIL import Image

    assert Image.open(summary["samples"]).text["sampler"] == "flow_euler"
    from diffusion_jax import pipeline
    from diffusion_jax.diffusion import flow

    pipe = pipeline.load(workdir / "checkpoints", cache_dir=None)
    assert isinstance(pipe.schedule, flow.FlowProcess)

"""LoRA training (configs/tiny_lora_train.py) from a tiny random base, and its export.

One training run is shared by the tests (a module fixture): only the factors change (the
base towers bitwise as they were, the optimizer holding the factors alone), a run killed
with SIGKILL resumes to the same factors bitwise, and `export --to peft|kohya` writes files
that our loader (convert/lora.py) merges into the trained params and that diffusers'
`load_lora_weights` applies to the base, exported to diffusers, with our pixels.
"""

import json
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint, cli, config_files, parallel, system
from diffusion_jax.adapters import lora_train
from diffusion_jax.convert import lora
from diffusion_jax.training import preflight
from test_training import REPO, _env, _train_command

sdxl = pytest.importorskip("test_sdxl_pipeline").sdxl  # the tiny SDXL fixture (diffusers, ours)

CONFIG = REPO / "configs" / "tiny_lora_train.py"
RUN_GROUP = pytest.mark.xdist_group("tiny_lora_run")  # one worker makes the base and the run
PIXEL_TOLERANCE = 2e-3
PROMPT, NEGATIVE = "a photo of a sneaker", "a photo of a bag"
SIZE = 32  # the tiny VAE downsamples 4x: 8x8 latents
BASE_ITEMS = ("unet", "vae", "text_encoder")


def random_base(config_path, path):
    """A checkpoint at `path` of the config's architecture with random weights (seed 3)."""
    sections = system.checkpoint_config(config_files.load(str(config_path)))
    checkpoint.create(path, system.init_params(system.from_config(sections), sections, seed=3),
                      sections)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A checkpoint of the tiny architecture with random weights: the frozen base."""
    return random_base(CONFIG, tmp_path_factory.mktemp("lora_base") / "ckpt")


def _train(workdir, base_dir):
    return _train_command(workdir, f"--config.init_from={base_dir}", config=CONFIG)


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """The workdir of one uninterrupted LoRA run on `base`."""
    workdir = tmp_path_factory.mktemp("lora_run")
    result = subprocess.run(_train(workdir, base), capture_output=True, text=True, cwd=REPO,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _items(path, names):
    return checkpoint.load(path, items=list(names))[0]


@RUN_GROUP  # the base fixture, made once
def test_step_0_is_the_base_model_and_down_starts_as_peft_initialises_it(base):
    params, config, _ = checkpoint.load_models(base)
    config = {**config, "lora": lora_train.default_config().to_dict()}
    factors = lora_train.init(config, jax.random.key(0))
    merged = lora_train.adapted({**params, "lora": factors}, config)
    jax.tree.map(np.testing.assert_array_equal, merged, params)  # up = 0: W + 0, bitwise
    for name, f in lora_train.modules(factors).items():
        # PEFT: kaiming_uniform_(lora_A, a=sqrt(5)), i.e. uniform in +-1/sqrt(in)
        bound = 1 / np.sqrt(f["down"].shape[1])
        assert 0.8 * bound < np.abs(f["down"]).max() <= bound, name


@RUN_GROUP
def test_only_the_lora_factors_change(base, run):
    before, after = _items(base, BASE_ITEMS), _items(run / "checkpoints", BASE_ITEMS)
    jax.tree.map(np.testing.assert_array_equal, after, before)  # bitwise: frozen
    config = checkpoint.read_config(run / "checkpoints")
    trained = _items(run / "checkpoints", ["lora"])["lora"]
    fresh = jax.device_get(lora_train.init(config, jax.random.fold_in(jax.random.key(0), 3)))
    modules, initial = lora_train.modules(trained), lora_train.modules(fresh)
    assert sorted(modules) == sorted(initial)
    assert {m.split("/")[0] for m in modules} == {"unet", "text_encoder"}
    for name, factors in modules.items():  # up starts at zero: both factors moved
        assert not np.array_equal(factors["up"], 0 * factors["up"]), name
        assert not np.array_equal(factors["down"], initial[name]["down"]), name
        assert factors["down"].shape[0] == factors["up"].shape[1] == 2  # the config's rank
    # The optimizer holds the factors alone: AdamW's two moments of each, nothing more.
    opt = _items(run / "checkpoints", ["optimizer"])["optimizer"]["opt_state"]
    moments = [x for x in jax.tree.leaves(opt) if x.ndim]  # (and scalar step counts)
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(trained))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diffusion_train_step_compilations"] == 1 and "vae_eval_loss" not in summary


@RUN_GROUP
def test_the_frozen_base_is_saved_once_beside_the_steps(base, run):
    steps = checkpoint.steps(run / "checkpoints")
    assert steps == [4, 6]  # keep 2 (the best by eval loss, step 6, among them)
    for step in steps:  # each step holds the factors and the optimizer, not the base again
        held = sorted(p.name for p in (run / "checkpoints" / str(step)).iterdir() if p.is_dir())
        assert held == ["config", "lora", "optimizer", "trainer"], held
        assert checkpoint.read_config(run / "checkpoints", step)["frozen_towers"] == {
            "folder": "frozen", "items": list(BASE_ITEMS)}
    assert checkpoint.steps(run / "frozen") == [0]
    jax.tree.map(np.testing.assert_array_equal, _items(run / "frozen", BASE_ITEMS),
                 _items(base, BASE_ITEMS))
    size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size(run / "checkpoints" / "6") < size(run / "frozen" / "0") / 5


@RUN_GROUP
def test_a_step_folder_copied_without_the_frozen_base_says_what_to_copy(run, tmp_path):
    import shutil

    copy = tmp_path / "copy" / "checkpoints"
    shutil.copytree(run / "checkpoints", copy)
    with pytest.raises(checkpoint.CheckpointError, match=r"keeps its frozen towers in .*frozen, "
                       r"which is missing or incomplete: copy the run's `frozen/` folder"):
        checkpoint.load_models(copy / "6")


@RUN_GROUP
def test_a_bfloat16_base_trains_and_the_saved_base_stays_float32(base, run, tmp_path):
    workdir = tmp_path / "bf16"
    result = subprocess.run([*_train(workdir, base), "--config.frozen_dtype=bfloat16"],
                            capture_output=True, text=True, cwd=REPO, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    saved = _items(workdir / "frozen", BASE_ITEMS)
    jax.tree.map(np.testing.assert_array_equal, saved, _items(base, BASE_ITEMS))
    assert {x.dtype for x in jax.tree.leaves(saved)} == {np.dtype(np.float32)}
    # The factors trained against the rounded base: close to, not equal to, the f32 run's.
    ours, f32 = (_items(w / "checkpoints", ["lora"])["lora"] for w in (workdir, run))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(ours))
    differ = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours),
                                                      jax.tree.leaves(f32))]
    assert any(differ)
    rel = max(np.abs(a - b).max() / np.abs(b).max()
              for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(f32)))
    assert rel < 0.2, rel


def test_the_dry_run_holds_the_frozen_base_in_bfloat16(base):
    from diffusion_jax.training import frozen, trainer

    config = config_files.load(str(CONFIG))
    config.init_from, config.frozen_dtype = str(base), "bfloat16"
    ckpt_config = trainer.model_config(config)
    assert frozen.names(config, ckpt_config) == BASE_ITEMS
    towers = frozen.cast(preflight.abstract_towers(ckpt_config), BASE_ITEMS,
                         frozen.dtype(config))
    mesh = parallel.make_mesh(config.mesh)
    program = trainer.stage_program(config, ckpt_config, mesh, "diffusion", towers)
    assert {x.dtype for x in jax.tree.leaves(program.frozen)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(program.trained)} == {np.dtype(np.float32)}
    # The dry run lowers the step on those shapes (bfloat16 base, float32 factors).
    report = preflight.compile_stage(config, ckpt_config, mesh, "diffusion", compile=False)
    assert report["frozen_params"] == sum(x.size for n in BASE_ITEMS
                                          for x in jax.tree.leaves(towers[n]))


@RUN_GROUP
def test_sigkill_then_resume_gives_the_same_factors_bitwise(base, run, tmp_path):
    workdir = tmp_path / "killed"
    process = subprocess.Popen(_train(workdir, base), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        ckpts = workdir / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(_train(workdir, base), capture_output=True, text=True, cwd=REPO,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    names = ("lora", "optimizer", *BASE_ITEMS)
    jax.tree.map(np.testing.assert_array_equal, _items(workdir / "checkpoints", names),
                 _items(run / "checkpoints", names))


def _export(run, tmp_path, to):
    out = tmp_path / f"{to}.safetensors"
    assert cli.main(["export", "--checkpoint", str(run / "checkpoints"), "--to", to,
                     "--out", str(out)]) == 0
    return out


@RUN_GROUP
@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_our_loader_reads_the_export_back_as_the_trained_params(base, run, tmp_path, to):
    import safetensors

    file = _export(run, tmp_path, to)
    with safetensors.safe_open(file, framework="numpy") as f:
        keys = list(f.keys())
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    text = "text_model.encoder.layers.0.self_attn.q_proj"
    expected = ({f"unet.{module}.lora_A.weight", f"text_encoder.{text}.lora_B.weight"} if to == "peft"
                else {f"lora_unet_{module.replace('.', '_')}.alpha",
                      f"lora_te_{text.replace('.', '_')}.lora_up.weight"})
    assert expected <= set(keys)
    params, config, _ = checkpoint.load_models(base)
    merged = lora.merge(params, config, [(lora.read(file), 1.0)])
    trained, _, _ = checkpoint.load_models(run / "checkpoints")  # the run's, factors merged in
    changed = 0
    for tower in params:
        for x, y, b in zip(*(jax.tree.leaves(t[tower]) for t in (merged, trained, params))):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
            changed += not np.array_equal(y, b)
    assert changed == len(lora_train.modules(_items(run / "checkpoints", ["lora"])["lora"]))


def _ours(root, run, latents):
    np.save(root / "latents.npy", latents)
    out = root / "ours.npy"
    assert cli.main(["sample", "--checkpoint", str(run / "checkpoints"), "--prompt", PROMPT,
                     "--negative-prompt", NEGATIVE, "--sampler", "ddim", "--steps", "5",
                     "--guidance", "7.5", "--num-images", str(len(latents)), "--height",
                     str(SIZE), "--width", str(SIZE), "--init-latents",
                     str(root / "latents.npy"), "--out", str(out)]) == 0
    return np.load(out)


@RUN_GROUP
@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_diffusers_loads_the_export_and_gives_our_pixels(base, run, tmp_path, to):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    file = _export(run, tmp_path, to)
    assert cli.main(["export", "--checkpoint", str(base), "--out", str(tmp_path / "base")]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    latents = np.random.default_rng(1).standard_normal((2, 4, SIZE // 4, SIZE // 4)).astype(
        np.float32)
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5,
                guidance_scale=7.5, num_images_per_prompt=2, height=SIZE, width=SIZE,
                output_type="np")
    plain = pipe(**call, latents=torch.from_numpy(latents)).images
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="trained")
    expected = pipe(**call, latents=torch.from_numpy(latents)).images
    ours = _ours(tmp_path, run, latents)
    change, error = np.abs(expected - plain).max(), np.abs(ours - expected).max()
    print(f"{to}: max pixel error {error:.2e}, the LoRA's change {change:.2e}")
    assert change > 10 * PIXEL_TOLERANCE, "the LoRA hardly changes the images: a weak test"
    assert error <= PIXEL_TOLERANCE


def test_the_real_lora_configs_pass_the_dry_run(tmp_path_factory):
    """SD 1.5 and SDXL LoRA runs lowered on abstract shapes for 8 devices: only the factors
    of the attention projections are trained, every base tower frozen."""
    from test_preflight import _dry_runs, _local_paths

    root = tmp_path_factory.mktemp("lora_configs")
    names = ("lora_sd15", "lora_sdxl")
    runs = [["--config", name, "--workdir", str(root / name), "--no-compile",
             *_local_paths(name, [], root)] for name in names]
    reports = dict(zip(names, _dry_runs(runs, 8, root)))
    # rank 16 on to_q, to_k, to_v, to_out of SD 1.5's 16 transformer blocks' attn1 and attn2:
    # 4 x the 797,184 of diffusers' rank-4 train_text_to_image_lora
    assert "lora 3,188,736" in reports["lora_sd15"] and "unet 859,520,964" in reports["lora_sd15"]
    assert "trains 3,188,736 params" in reports["lora_sd15"]
    lora_sdxl = int(re.search(r"lora ([\d,]+)", reports["lora_sdxl"])[1].replace(",", ""))
    assert f"trains {lora_sdxl:,} params" in reports["lora_sdxl"]
    assert "unet 2,567,463,684" in reports["lora_sdxl"]


# ----------------------------------------------------------------------------- refusals


@RUN_GROUP  # the base fixture, made once
@pytest.mark.parametrize("override, message", [
    (("lora", "rank", 0), "--config.lora.rank=0: must be an integer >= 1"),
    (("lora", "targets", (r"unet/.*/to_qq",)), r"--config.lora.targets: r'unet/.*/to_qq' "
                                                "matches no layer; module paths look like"),
    (("lora", "targets", (r"unet/conv_in",)), "--config.lora.targets match 1 conv layers "
                                              r"\(unet/conv_in\); only Linear layers"),
])
def test_bad_lora_sections_fail_in_one_line(base, override, message):
    config = config_files.load(str(CONFIG))
    config.init_from = str(base)
    section, key, value = override
    config[section][key] = value
    with pytest.raises(ValueError, match=message):
        preflight.validate(config)


@RUN_GROUP
def test_resuming_with_other_factors_says_which(base, run):
    config = config_files.load(str(CONFIG))
    config.init_from = str(base)
    config.lora.rank = 8
    with pytest.raises(ValueError, match=r"holds a run of another architecture \(lora.rank was "
                                         r"2, now 8\)"):
        preflight.validate(config, run)


@RUN_GROUP  # the base fixture, made once
def test_exporting_a_checkpoint_without_factors_says_what_to_do(base, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(base), "--to", "kohya",
                     "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "holds no LoRA factors" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(base), "--to", "peft",
                     "--out", str(tmp_path / "x")]) == 1
    assert "a LoRA is written as one .safetensors file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SDXL export


def _with_factors(ckpt, out, targets, seed: int, magnitude: float):
    """A copy of checkpoint `ckpt` with random LoRA factors of `targets` (rank 4, alpha 2)
    as a LoRA run would hold them (`up` non-zero), written to `out`."""
    params, config, _ = checkpoint.load_models(ckpt)
    config = {**config, "lora": {"rank": 4, "alpha": 2.0, "targets": list(targets)}}
    factors = jax.device_get(lora_train.init(config, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    factors = jax.tree.map(lambda x: x if x.any() else magnitude * rng.standard_normal(
        x.shape).astype(np.float32), factors)
    checkpoint.create(out, {**params, "lora": factors}, config)
    return out


@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_an_sdxl_export_with_both_text_towers_gives_diffusers_our_pixels(sdxl, tmp_path, to):
    """Factors in the U-Net's attention and both text towers' of the tiny SDXL: kohya's file
    under the SGM block names and lora_te1_ / lora_te2_."""
    torch = pytest.importorskip("torch")
    import test_sdxl_pipeline as xl

    base, ckpt, _, _, root = sdxl
    run = _with_factors(ckpt, tmp_path / "run", (lora_train.ATTENTION, lora_train.TEXT_ATTENTION),
                        seed=6, magnitude=1.0)
    file = tmp_path / f"{to}.safetensors"
    assert cli.main(["export", "--checkpoint", str(run), "--to", to, "--out", str(file)]) == 0
    if to == "kohya":
        from safetensors.numpy import load_file

        keys = set(load_file(file))
        assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight"} <= keys
    latents = xl._latents(1, count=2)
    ours = xl._sample_cli(root, run, f"lora_train_{to}", latents, "--sampler", "euler")
    base.scheduler = xl._scheduler(base, "euler")
    call = dict(prompt=xl.PROMPT, negative_prompt=xl.NEGATIVE, num_inference_steps=xl.STEPS,
                guidance_scale=xl.GUIDANCE, num_images_per_prompt=2, output_type="np")
    plain = base(**call, latents=torch.from_numpy(latents)).images
    base.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="exported")
    try:
        expected = base(**call, latents=torch.from_numpy(latents)).images
    finally:
        base.unload_lora_weights()
    change, error = np.abs(expected - plain).max(), np.abs(ours - expected).max()
    print(f"SDXL {to}: max pixel error {error:.2e}, the LoRA's change {change:.2e}")
    assert change > 10 * xl.PIXEL_TOLERANCE, "the LoRA hardly changes the images: a weak test"
    assert error <= xl.PIXEL_TOLERANCE

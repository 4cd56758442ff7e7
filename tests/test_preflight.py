"""The preflight every training run starts with, and `diffusion-jax train --dry-run`.

Bad configs fail in one line naming the key before anything is written or compiled; every
config in the repository and every training command README.md and launch/README.md show
passes the dry run on the device count its example implies (fake CPU devices), with the
real architectures (SD 1.5: 859,520,964 U-Net params) lowered abstractly and SD 1.5's step
compiled for a v4-32's 16 chips.

The init_from checkpoints here are stubs: the real architectures' configs with one-element
arrays, since the preflight reads a checkpoint's config and item names, never its weights
(training itself restores them with shape checks).
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from diffusion_jax import checkpoint, cli, config_files, system
from diffusion_jax.data import buckets, sources
from diffusion_jax.training import preflight
from diffusion_jax.training.trainer import model_config

REPO = Path(__file__).resolve().parent.parent
TRAINING_CONFIGS = ("default", "tiny_train", "tiny_sdxl_train", "flow_demo", "tiny_flow_train",
                    "sd15_finetune", "sdxl_finetune",
                    "sd21_finetune", "tiny_lora_train", "lora_sd15", "lora_sdxl",
                    "tiny_dreambooth_train", "dreambooth_sd15", "dreambooth_demo", "tiny_flux_train",
                    "tiny_sd3_train", "flux_dev_finetune", "flux_dev_lora", "sd3_medium_finetune",
                    "sd3_medium_lora",
                    "sd21_base_pretrain:256", "sd21_base_pretrain:512", "controlnet_demo",
                    "tiny_controlnet_train")
ARCHITECTURE_CONFIGS = ("sd15", "sd21", "sd21_base", "sdxl_base", "sdxl_refiner", "sdxl_bench", "tiny",
                        "bench", "flux_dev", "flux_schnell", "sd3_medium", "sd35_medium", "sd35_large",
                        "controlnet_sd15", "controlnet_sdxl", "flux_bench")


def test_the_lists_above_are_every_bundled_config():
    # Sections for other configs to import, no get_config.
    helpers = {"base_training", "t5"}
    names = {c.split(":")[0] for c in TRAINING_CONFIGS + ARCHITECTURE_CONFIGS} | helpers
    assert names == set(config_files.bundled_names()) | helpers
    assert sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__") == sorted(
        names)


# ----------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("args, message", [
    (["--config", "sd15"], "describes only a model architecture"),
    (["--config", "configs/sd15.py"], "train with a training config such as sd15_finetune"),
    (["--config", "nope"], "not a bundled config name"),
    (["--config", "elsewhere/sd15_finetune.py"], "no such file"),  # only configs/NAME.py falls back
    (["--config", "sd21_base_pretrain:1024"], "the phases are 256, 512"),
    (["--config", "tiny_train:x"], "get_config() takes no argument"),
    (["--config.dtype=bf16"], "--config.dtype='bf16': not one of 'float32', 'bfloat16'"),
    (["--config.remat_policy=bogus"], "--config.remat_policy='bogus': not one of"),
    (["--config.attention=flash"], "--config.attention='flash': not one of 'chunked', 'splash'"),
    (["--config.sample.sampler=dpm"], "--config.sample.sampler='dpm': unknown sampler"),
    (["--config.training.min_snr_gamma=-1"], "--config.training.min_snr_gamma=-1.0: must be >= 0"),
    (["--config.training.ema_decay=1.5"], "training.ema_decay=1.5: must be >= 0 and < 1"),
    (["--config.training.gradient_accumulation=3"], "multiple of training.gradient_accumulation=3"),
    (["--config.mesh.fsdp=3"], "mesh.fsdp=3 does not divide the 1 devices"),
    (["--config.data.batch_size=0"], "--config.data.batch_size=0: must be >= 1"),
    (["--config.data.source=folder"], "data.source='folder' needs a path"),
    (["--config.data.source=folder", "--config.data.path=/no/such/dir"], "/no/such/dir"),
    (["--config.data.source=folder", "--config.data.path=gs://b/images"],
     "mount the bucket with gcsfuse"),
    (["--config.data.source=imagenet"], "--config.data.source='imagenet': not one of"),
    (["--config.unet.cross_attention_dim=32"], "must equal text_encoder.hidden_size=16"),
    (["--config.data.image_size=36"], "--config.data.image_size=36: must be a multiple of 8"),
    (["--config.vae_training.steps=0"], "the VAE would stay random"),
    (["--config.init_from=/no/such/ckpt"], "--config.init_from='/no/such/ckpt'"),
    (["--config.data.source=folder", "--config.data.path=.", "--config.final_eval.fid_samples=5"],
     "final_eval.fid_samples=5: the demo's class accuracy and Fashion-MNIST FID"),
    (["--config.training.trainable=('unett/.*',)"], "--config.training.trainable: r'unett/.*' "
     "matches no param; params start with unet/, vae/, text_encoder/"),
    (["--config.training.trainable=('unet/(',)"], "--config.training.trainable: r'unet/(' is "
     "not a regex"),
    (["--config.training.ema=('text_encoder/.*',)"],
     "--config.training.ema: r'text_encoder/.*' matches no trained param"),
    (["--config.vae_training.trainable=()"], "--config.vae_training.trainable=(): needs at "
     "least one rule"),
])
def test_a_bad_config_fails_in_one_line_before_anything_is_written(tmp_path, capsys, args, message):
    if "--config" not in args:
        args = ["--config", "tiny_train", *args]
    workdir = tmp_path / "w"
    assert cli.main(["train", *args, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("diffusion-jax: error: ") and err.count("\n") == 1, err
    assert not workdir.exists()


def test_an_init_from_of_another_architecture_names_the_fields(tmp_path, capsys):
    other = config_files.load("tiny_train")
    other.unet.block_out_channels = (16, 32)
    checkpoint.save(tmp_path / "ckpt", 0, {n: {"stub": np.zeros(1)} for n in
                                           ("unet", "vae", "text_encoder")}, model_config(other))
    assert cli.main(["train", "--config", "tiny_train", "--workdir", str(tmp_path / "w"),
                     f"--config.init_from={tmp_path / 'ckpt'}"]) == 1
    err = capsys.readouterr().err
    assert "its architecture differs from this config's (unet.block_out_channels was (16, 32), " \
           "now (16, 16))" in err and err.count("\n") == 1


def test_resuming_a_workdir_of_another_architecture_says_so(tmp_path, capsys):
    other = config_files.load("tiny_train")
    other.text_encoder.num_hidden_layers = 2
    checkpoint.save(tmp_path / "w" / "checkpoints", 3, {"unet": {"stub": np.zeros(1)}},
                    model_config(other))
    assert cli.main(["train", "--config", "tiny_train", "--workdir", str(tmp_path / "w"),
                     "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert (f"workdir {tmp_path / 'w'} holds a run of another architecture "
            "(text_encoder.num_hidden_layers was 2, now 1)") in err and err.count("\n") == 1


@pytest.mark.parametrize("change, message", [
    ({"micro_conditioning": False}, "these latents hold no image sizes and crops"),
    ({"max_lengths": {"input_ids": 16, "input_ids_2": 8}}, "these latents hold the ids"),
    ({"max_lengths": None, "max_length": 16}, "these latents hold the ids"),  # one tower's
])
def test_sdxl_latents_that_cannot_train_it_fail_in_one_line(tmp_path, capsys, change, message):
    config = config_files.load("tiny_sdxl_train")
    folder = _latents_folder(tmp_path / "latents", config, 32)
    meta = json.loads((folder / sources.LATENTS_META).read_text())
    meta.update(change)
    (folder / sources.LATENTS_META).write_text(json.dumps(meta))
    assert cli.main(["train", "--config", "tiny_sdxl_train", "--workdir", str(tmp_path / "w"),
                     "--config.data.source=latents", f"--config.data.path={folder}",
                     "--config.vae_training.steps=0", "--dry-run", "--no-compile"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- fixtures


def _stub_checkpoint(path: Path, config) -> Path:
    """A checkpoint of `config`'s models with stub params; a T5 tower's tokenizer as a
    converted checkpoint keeps it (its tokenizer.json: a small Unigram model here)."""
    if not path.exists():
        sections = model_config(config)
        for tower in system.from_config(config).text_towers:
            if tower.kind == "t5":
                sections[tower.tokenizer] = _t5_section(sections[tower.tokenizer]["max_length"])
        checkpoint.save(path, 0, {n: {"stub": np.zeros(1, np.float32)}
                                  for n in system.from_config(config).names}, sections)
    return path


def _t5_section(max_length: int) -> dict:
    from tokenizers import Tokenizer, models

    from test_t5 import unigram_vocab

    tokenizer = Tokenizer(models.Unigram(unigram_vocab(), unk_id=2))
    return {"tokenizer_json": tokenizer.to_str(), "eos_token": "</s>", "pad_token": "<pad>",
            "max_length": max_length}


def _latents_folder(path: Path, config, image_size: int) -> Path:
    """A precomputed-latents folder as `diffusion-jax precompute` leaves it for `config`: the
    held-out split at `image_size`, the training split too or, with data.buckets, one file per
    bucket; two zero records in each file (the preflight reads no latents)."""
    if path.exists():
        return path
    path.mkdir(parents=True)
    factor = preflight.vae_factor(config)
    towers = system.from_config(config)
    lengths = {t.ids_key: config[t.tokenizer].max_length for t in towers.text_towers}
    micro = bool(system.time_ids_width(towers, config))
    square = (image_size, image_size)
    files = {"train": {"train.array_record": square}, "test": {"test.array_record": square}}
    if buckets.enabled(config.data.buckets):
        files["train"] = {f"train-{buckets.bucket_key(size)}.array_record": size
                          for size in buckets.bucket_sizes(config.data.buckets)}
    for name, (height, width) in {**files["train"], **files["test"]}.items():
        writer = ArrayRecordWriter(str(path / name), "group_size:1")
        for _ in range(2):
            writer.write(sources.encode_record({
                "latents": np.zeros((height // factor, width // factor,
                                     config.vae.latent_channels), np.float32),
                **{key: np.zeros(n, np.int32) for key, n in lengths.items()},
                "label": np.int32(-1),
                **({"original_size": np.int32([height, width]),
                    "crop_top_left": np.int32([0, 0])} if micro else {})}))
        writer.close()
    meta = {"source": "webdataset", "path": "", "image_size": image_size,
            **({"max_length": lengths["input_ids"]} if list(lengths) == ["input_ids"]
               else {"max_lengths": lengths}),
            "has_context": False, "micro_conditioning": micro,
            "splits": {split: 2 * len(names) for split, names in files.items()},
            "skipped": {}, "files": {split: list(names) for split, names in files.items()}}
    if buckets.enabled(config.data.buckets):
        meta["buckets"] = {"train": {name[len("train-"):-len(".array_record")]: [name]
                                     for name in files["train"]}}
    (path / sources.LATENTS_META).write_text(json.dumps(meta))
    return path


def _local_paths(config_spec: str, overrides: list[str], root: Path) -> list[str]:
    """The overrides with init_from and data.path pointed at local stand-ins of what the
    example names (a gs:// bucket cannot be reached here)."""
    config = config_files.load(config_spec)
    stand_ins = {"--config.final_eval.fid_reference=": lambda: _image_folder(root / "images"),
                 "--config.final_eval.clip_model=": lambda: _clip_folder(root / "clip")}
    replaced = [f"{key}{make()}" for key, make in stand_ins.items()
                if any(o.startswith(key) for o in overrides)]
    overrides = [o for o in overrides if not o.startswith(tuple(stand_ins))] + replaced
    out = [o for o in overrides if not o.startswith(("--config.init_from=", "--config.data.path="))]
    config_overrides = [o[len("--config."):].split("=", 1) for o in out]
    from diffusion_jax.config_overrides import apply_overrides

    apply_overrides(config, [tuple(kv) for kv in config_overrides])
    tag = re.sub(r"\W", "_", config_spec)
    if config.init_from or any(o.startswith("--config.init_from=") for o in overrides) or (
            not config.vae_training.steps):
        out.append(f"--config.init_from={_stub_checkpoint(root / f'ckpt_{tag}', config)}")
    if config.data.source == "latents":
        size = config.data.image_size
        out.append(f"--config.data.path={_latents_folder(root / f'latents_{tag}_{size}', config, size)}")
    elif config.data.source == "folder":
        out.append(f"--config.data.path={_image_folder(root / 'images')}")
    return out


def _clip_folder(path: Path) -> Path:
    """A transformers CLIPModel folder of random weights (what final_eval.clip_model names)."""
    from test_training import tiny_clip_folder

    if not path.exists():
        path.mkdir(parents=True)
        tiny_clip_folder(path)
    return path


def _image_folder(path: Path) -> Path:
    if not path.exists():
        from PIL import Image

        path.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (80, 64), (40 * i, 90, 200)).save(path / f"{i}.png")
            (path / f"{i}.txt").write_text(f"a photo of colour {i}")
    return path


def _dry_runs(runs: list[list[str]], devices: int, tmp_path: Path) -> list[str]:
    """`diffusion-jax train ARGS --dry-run --devices N` for each ARGS, in one process (one
    import, one fake-device backend); the report of each run."""
    script = ("import sys, json\nfrom diffusion_jax import cli\n"
              "codes = [cli.main(['train', *args]) for args in json.loads(sys.argv[1])]\n"
              "sys.exit(max(codes))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               DIFFUSION_JAX_CACHE_DIR=str(tmp_path / "xla"))
    runs = [[*args, "--dry-run", "--devices", str(devices)] for args in runs]
    result = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reports = result.stdout.split("preflight: the config is valid")[1:]
    assert len(reports) == len(runs), result.stdout
    return reports


# ----------------------------------------------------------------------------- every config


@pytest.mark.parametrize("name", ARCHITECTURE_CONFIGS)
def test_an_architecture_file_is_refused_for_training_in_one_line(name, tmp_path, capsys):
    assert cli.main(["train", "--config", name, "--workdir", str(tmp_path / "w"), "--dry-run"]) == 1
    assert "describes only a model architecture" in capsys.readouterr().err


def test_every_training_config_passes_the_dry_run(tmp_path_factory):
    """Lowered on abstract shapes for 8 devices (their meshes resolve for any count);
    compiling each real model takes minutes here, so SD 1.5's compile is the README test."""
    root = tmp_path_factory.mktemp("configs")
    runs = [["--config", name, "--workdir", str(root / f"w{i}"), "--no-compile",
             *_local_paths(name, [], root)] for i, name in enumerate(TRAINING_CONFIGS)]
    reports = _dry_runs(runs, 8, root)
    by_name = dict(zip(TRAINING_CONFIGS, reports))
    assert "unet 859,520,964" in by_name["sd15_finetune"]  # the released SD 1.5 U-Net
    assert "unet 2,567,463,684" in by_name["sdxl_finetune"]  # SDXL base, at 1024x1024
    assert "global batch 32 (4 per device)" in by_name["sdxl_finetune"]
    assert "unet 865,910,724" in by_name["sd21_finetune"]  # SD 2.1's
    assert "global batch 64 (8 per device)" in by_name["sd15_finetune"]
    assert "mesh {'data': 2, 'fsdp': 4}" in by_name["sd21_base_pretrain:256"]
    # No VAE stage in a fine-tune (the VAE comes from init_from); the demo has both.
    assert re.search(r"^  vae +steps", by_name["sd15_finetune"], re.M) is None
    assert re.search(r"^  vae +steps 1\.\.500,", by_name["default"], re.M)
    # The flow transformers: the released counts; a LoRA trains its factors alone, the whole
    # base frozen in bfloat16 (a fine-tune: the text towers and the VAE).
    for name in ("flux_dev_finetune", "flux_dev_lora"):
        assert "transformer 11,901,408,320" in by_name[name]
        assert "text_encoder_2 4,762,310,656" in by_name[name]  # T5-XXL
    assert "trains 11,901,408,320 params" in by_name["flux_dev_finetune"]
    assert "frozen vae+text_encoder+text_encoder_2, frozen_dtype bfloat16" in by_name[
        "flux_dev_finetune"]
    # rank 16 x (3072 + 3072) on to_q, to_k, to_v, to_out of the 19 double-stream blocks and
    # to_q, to_k, to_v of the 38 single-stream ones
    assert f"trains {16 * 6144 * (4 * 19 + 3 * 38):,} params" in by_name["flux_dev_lora"]
    assert "frozen transformer+vae+text_encoder+text_encoder_2, frozen_dtype bfloat16" in \
        by_name["flux_dev_lora"]
    assert "trains 2,028,328,000 params" in by_name["sd3_medium_finetune"]
    # rank 16 x (1536 + 1536) on attn's to_q, to_k, to_v, to_out of SD3 Medium's 24 blocks
    assert f"trains {16 * 3072 * 4 * 24:,} params" in by_name["sd3_medium_lora"]


# ----------------------------------------------------------------------------- the READMEs


def _shell_commands(markdown: str) -> list[list[str]]:
    """Every command of the markdown's ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for part in " ".join(words).split(" && "):  # `pip install ... && diffusion-jax train`
                commands.append(shlex.split(part))
    return [c for c in commands if c]


def _gpus(words: list[str], flag: str) -> int | None:
    for w in words:
        if w.startswith(f"{flag}="):
            return int(w.split("=")[1])
    return None


def _training_example(words: list[str]) -> tuple[list[str], int] | None:
    """(train arguments, devices the example implies) of a training command, else None."""
    if words[:2] == ["diffusion-jax", "train"]:
        devices, args = 1, words[2:]
    elif words[0] in ("launch/tpu_pod.sh", "launch/tpu_queued.sh") and words[1] in (
            "up", "train", "supervise"):
        kind = words[words.index("--accelerator-type") + 1] if "--accelerator-type" in words else "v4-8"
        count = int(kind.rsplit("-", 1)[1])
        devices = count // 2 if kind.startswith(("v4", "v5p")) else count
        args = words[2:]
    elif words[0] == "sbatch":
        devices = (_gpus(words, "--nodes") or 2) * (_gpus(words, "--gpus-per-node") or 8)
        args = words[words.index("launch/gpu_slurm.sbatch") + 1:]
    elif words[0] == "launch/gpu_node.sh":
        devices = len(words[words.index("--gpus") + 1].split(",")) if "--gpus" in words else 8
        args = words[1:]
    elif words[0] == "launch/gpu_multinode.sh":
        devices = 8 * int(words[words.index("--num-processes") + 1])
        args = words[1:]
    else:
        return None
    train, i = [], 0
    while i < len(args):  # keep --config, --workdir and --config.KEY=VALUE, in one word each
        word = args[i]
        if word in ("--config", "--workdir"):
            train += [word, args[i + 1]]
            i += 2
            continue
        if word.startswith("--config."):
            if "=" not in word:
                word, i = f"{word}={args[i + 1]}", i + 1
            train.append(word)
        i += 1
    return train, devices


def test_every_training_command_the_readmes_show_passes_the_dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    examples = {}
    for readme in ("README.md", "launch/README.md"):
        for words in _shell_commands((REPO / readme).read_text()):
            found = _training_example(words)
            if found:
                train, devices = found
                if "--config" not in train:
                    train = ["--config", "default", *train]  # the CLI's default
                examples.setdefault((devices, tuple(train)), readme)
    configs = {args[args.index("--config") + 1] for _, args in examples}
    assert {"configs/default.py", "configs/sd15_finetune.py"} <= configs, configs
    assert {d for d, _ in examples} >= {1, 16, 32}, examples  # one machine, v4-32, 4x8 GPUs
    by_devices: dict[int, list] = {}
    compiled = False
    for i, (devices, train) in enumerate(sorted(examples)):
        spec = train[train.index("--config") + 1]
        overrides = [w for w in train if w.startswith("--config.")]
        args = ["--config", spec, "--workdir", str(root / f"w{i}"),
                *_local_paths(spec, overrides, root)]
        # SD 1.5 on a v4-32 is compiled once (XLA's per-device memory); the rest is lowered.
        if devices == 16 and "sd15_finetune" in spec and not compiled:
            compiled = True
        else:
            args.append("--no-compile")
        by_devices.setdefault(devices, []).append(args)
    for devices, runs in sorted(by_devices.items()):
        reports = _dry_runs(runs, devices, root)
        for args, report in zip(runs, reports):
            if "--no-compile" not in args:
                assert "unet 859,520,964" in report and "global batch 64 (4 per device)" in report
                assert "compiled in" in report and re.search(r"per device: [\d.]+ GiB", report)
    assert compiled


# ----------------------------------------------------------------------------- dry run itself


def test_dry_run_compiles_both_stages_on_fake_devices_and_writes_nothing(tmp_path):
    [report] = _dry_runs([["--config", "tiny_train", "--workdir", str(tmp_path / "w"),
                           "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=64"]], 4, tmp_path)
    assert "devices   4 x cpu, mesh {'data': 2, 'fsdp': 2}" in report
    assert re.search(r"vae +steps 1\.\.6, global batch 8 \(2 per device\); trains 19,991 params; "
                     r"lowered in [\d.]+ s, compiled in [\d.]+ s", report), report
    assert re.search(r"diffusion steps 7\.\.14, global batch 8 \(2 per device\); trains "
                     r"110,276 params", report)
    assert report.count("per device: ") == 2
    # Fake devices stand in for accelerators: their attention, not the CPU's chunked one.
    assert "attention xla" in report
    assert not (tmp_path / "w").exists()


def test_ema_decay_0_keeps_no_ema_copy():
    """What lets SD 1.5 fine-tune on a 24 GiB CPU machine: no params-sized EMA buffer."""
    from diffusion_jax import parallel
    from diffusion_jax.training.trainer import stage_program

    config = config_files.load("tiny_train")
    mesh = parallel.make_mesh(config.mesh)
    ckpt_config = model_config(config)
    towers = preflight.abstract_towers(ckpt_config)
    with_ema = stage_program(config, ckpt_config, mesh, "diffusion", towers)
    config.training.ema_decay = 0.0
    without = stage_program(config, ckpt_config, mesh, "diffusion", towers)
    assert without.state_shapes.ema_params is None and without.ema_max_decay is None
    assert preflight.count_params(with_ema.state_shapes.ema_params) == 110_276

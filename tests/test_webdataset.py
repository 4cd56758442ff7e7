"""WebDataset shards -> `diffusion-jax precompute` -> array_record latents -> training.

Shards are made here: tars of tiny jpg + txt (one json caption) with a corrupt jpg, a
non-image, a too-small image, a corrupt tar header and a truncated tar among them; the models
are configs/tiny_train.py's, randomly initialised."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import checkpoint
from diffusion_jax.config_files import load as load_config_file
from diffusion_jax.config_overrides import apply_overrides
from diffusion_jax.data import frozen_towers, input_pipeline, precompute, sources, webdataset_shards
from diffusion_jax.models import KINDS
from diffusion_jax.tokenizer import CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_train.py"
OVERRIDES = [("data.min_image_size", "24"), ("data.eval_fraction", "0.3"),
             ("data.batch_size", "4"), ("eval_examples", "4"), ("vae_training.steps", "0")]


def jpeg(seed: int, width: int = 48, height: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """Writes the members in order; returns each one's header offset."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def caption(key: str) -> str:
    return "picture " + "".join(chr(ord("a") + int(d)) for d in key[-3:])  # CLIP splits digits


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards; returns (folder, {key: (jpeg bytes, caption)} of the good samples,
    expected skip counts)."""
    root = tmp_path_factory.mktemp("shards")
    good = {}

    def sample(key, data=None, text=True, as_json=False):
        data = jpeg(int(key)) if data is None else data
        members = [(f"{key}.jpg", data)]
        if as_json:
            members.append((f"{key}.json", json.dumps({"caption": caption(key), "url": "x"}).encode()))
        elif text:
            members.append((f"{key}.txt", caption(key).encode()))
        return members

    # 00000: good samples, one captioned by json, a corrupt jpg and a non-image
    members = []
    for i in range(8):
        key = f"00000{i:04d}"
        members += sample(key, as_json=(i == 3))
        good[key] = (members[-2][1], caption(key))
    broken = bytearray(jpeg(99))
    broken[400:1200] = bytes(800)  # pixel data zeroed: PIL cannot decode it
    members += sample("000000008", bytes(broken)) + sample("000000009", b"not an image at all")
    write_tar(root / "00000.tar", members)
    # 00001: good samples, a too-small image; one member's tar header is corrupt
    members = []
    for i in range(8):
        key = f"00001{i:04d}"
        members += sample(key)
        good[key] = (members[-2][1], caption(key))
    members += sample("000010008", jpeg(5, 20, 30))
    offsets = write_tar(root / "00001.tar", members)
    data = bytearray((root / "00001.tar").read_bytes())
    data[offsets[4]:offsets[4] + 100] = b"\xff" * 100  # the header of 000010002.jpg
    (root / "00001.tar").write_bytes(bytes(data))
    del good["000010002"]
    # 00002: a truncated download: the last sample's image is cut off
    members = []
    for i in range(7):
        key = f"00002{i:04d}"
        members += sample(key)
        good[key] = (members[-2][1], caption(key))
    offsets = write_tar(root / "00002.tar", members)
    data = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(data[:offsets[-2] + 512 + 700])
    del good["000020006"]
    skipped = {"bad_tar": 1, "corrupt": 1, "missing_image": 1, "not_an_image": 1, "too_small": 1}
    return root, good, skipped


def tiny_config(*overrides):
    return apply_overrides(load_config_file(TINY), [*OVERRIDES, *overrides])


def cli(*args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "diffusion_jax.cli", "precompute",
                           "--config", str(TINY), *args, *(f"--config.{k}={v}" for k, v in OVERRIDES)],
                          capture_output=True, text=True, cwd=REPO, env=env, **kwargs)


# ----------------------------------------------------------------------------- the reader


def test_reader_decodes_captions_and_counts_bad_samples(shards):
    root, good, skipped = shards
    read = [pair for name in ("00000", "00001", "00002")
            for pair in webdataset_shards.read_shard(str(root / f"{name}.tar"))]
    examples = {k: e for k, e in read if isinstance(e, sources.Example)}
    reasons = sorted(e.reason for _, e in read if isinstance(e, sources.Skipped))
    assert reasons == sorted(r for r, n in skipped.items() for _ in range(n) if r != "too_small")
    assert set(examples) == set(good) | {"000010008"}  # too small: filtered by the pipeline
    for key, (data, text) in good.items():
        assert examples[key].caption == text
        np.testing.assert_array_equal(examples[key].image, np.asarray(Image.open(io.BytesIO(data))))


def test_captions_from_txt_then_json_caption_then_text():
    assert webdataset_shards.caption_of({"txt": b" a cat \n", "json": b'{"caption": "no"}'}) == "a cat"
    assert webdataset_shards.caption_of({"json": b'{"caption": "a dog", "text": "no"}'}) == "a dog"
    assert webdataset_shards.caption_of({"json": b'{"text": "a cow"}'}) == "a cow"
    assert webdataset_shards.caption_of({"json": b'{"url": "x"}'}) is None
    assert webdataset_shards.caption_of({"json": b"{broken"}) is None
    example = webdataset_shards.decode_sample({"__key__": "k", "png": _png()}, "s/k")
    assert example.caption == "" and example.conversions == ("missing_caption",)


def _png():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    return buffer.getvalue()


def test_spec_expansion_and_its_errors(tmp_path):
    assert webdataset_shards.expand_spec("gs://b/laion/{00000..00002}.tar") == [
        "gs://b/laion/00000.tar", "gs://b/laion/00001.tar", "gs://b/laion/00002.tar"]
    for spec, message in [("", "empty"), ("/d/{000..002.tar", "unbalanced braces"),
                          ("/d/images/", "not a tar shard"), ("pipe:gsutil cat gs://b/0.tar", "pipe:")]:
        with pytest.raises(ValueError, match=message):
            webdataset_shards.expand_spec(spec)
    (tmp_path / "00001.tar").write_bytes(b"")
    urls = webdataset_shards.expand_spec(str(tmp_path / "{00000..00002}.tar"))
    assert webdataset_shards.existing_shards(urls) == [str(tmp_path / "00001.tar")]


def test_processes_take_disjoint_shards_covering_all():
    shards = list(enumerate(f"{i:05d}.tar" for i in range(10)))
    parts = [webdataset_shards.process_shards(shards, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(sum(parts, [])) == shards and parts[1][:2] == [(1, "00001.tar"), (4, "00004.tar")]
    with pytest.raises(ValueError, match="not in"):
        webdataset_shards.process_shards(shards, 3, 3)


# ----------------------------------------------------------------------------- precompute


def expected_rows(good, config, tokenizer, keys):
    """What precompute must store for `keys`: the images center-cropped (the tiny config has
    random_crop off), encoded by the trainer's random-init VAE, their captions tokenized."""
    vae_cfg = KINDS["vae"].config_from_dict(config.vae.to_dict())
    vae_params = KINDS["vae"].init_params(vae_cfg, jax.random.fold_in(jax.random.key(config.seed), 1))
    vae = KINDS["vae"].build(vae_cfg)
    images = []
    for key in keys:
        image = np.asarray(Image.open(io.BytesIO(good[key][0])).convert("RGB"))
        fitted, _, _ = input_pipeline.fit_image(image, config.data.image_size, None)
        images.append(fitted.astype(np.float32) / 127.5 - 1.0)
    posterior = vae.apply({"params": vae_params}, np.stack(images), method=vae.encode)
    return (np.asarray(posterior.mean) * config.vae.scaling_factor,
            tokenizer([good[k][1] for k in keys]))


def split_keys(good, config, held_out):
    keys = sorted(good)  # tar order: the keys are written in order
    return [k for k in keys if sources.held_out(k, config.data.eval_fraction) == held_out]


@pytest.fixture(scope="module")
def precomputed(shards, tmp_path_factory):
    root, _, _ = shards
    out = tmp_path_factory.mktemp("latents")
    result = cli("--from", "webdataset", str(root / "{00000..00002}.tar"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_precompute_writes_the_vae_latents_and_counts(shards, precomputed):
    _, good, skipped = shards
    out, result = precomputed
    assert "img/s" in result.stderr and "RANDOM weights" in result.stderr
    assert f"wrote {len(good)} images from 3 shards" in result.stdout
    assert "skipped: bad_tar 1, corrupt 1, missing_image 1, not_an_image 1, too_small 1" in result.stdout
    meta = json.loads((out / "latents.json").read_text())
    config = tiny_config()
    tokenizer = CLIPTokenizer.bundled(**config.tokenizer)
    total = {}
    for split in ("train", "test"):
        for reason, n in meta["skipped"][split].items():
            total[reason] = total.get(reason, 0) + n
    assert total == skipped
    assert meta["files"]["train"] == [f"train-{i:05d}.array_record" for i in range(3)]
    assert meta["settings"]["latents"] == "posterior mean * vae.scaling_factor"
    for split, held_out in (("train", False), ("test", True)):
        keys = split_keys(good, config, held_out)
        assert meta["splits"][split] == len(keys) > 0
        source = sources.LatentsSource(str(out), split)
        records = [source[i] for i in range(len(source))]
        latents, input_ids = expected_rows(good, config, tokenizer, keys)
        np.testing.assert_allclose(np.stack([r["latents"] for r in records]), latents, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.stack([r["input_ids"] for r in records]), input_ids)
        assert records[0]["context"].shape == (tokenizer.max_length, config.text_encoder.hidden_size)
    assert not list(out.glob("*.tmp"))


def test_rerun_skips_finished_shards_and_refuses_other_settings(shards, precomputed, tmp_path):
    root, _, _ = shards
    out = tmp_path / "latents"
    shutil.copytree(precomputed[0], out)
    (out / "shard-00001.json").unlink()
    (out / "latents.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[02].array_record")}
    config = tiny_config()
    tokenizer = CLIPTokenizer.bundled(**config.tokenizer)
    plan = precompute.plan_webdataset(str(root / "{00000..00002}.tar"), out, config.data, tokenizer,
                                      frozen_towers.describe(config))
    assert plan.todo == [(1, str(root / "00001.tar"))]
    encode, text = frozen_towers.frozen_encoders(config, frozen_towers.load_params(config))
    result = precompute.encode_shards(plan, encode, text, tokenizer)
    assert result["shards_done"] == 1 and result["shards_before"] == 2 and result["finalized"]
    assert result["skipped"] == {"missing_image": 1, "too_small": 1}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[02].array_record")} == before
    assert json.loads((out / "latents.json").read_text()) == json.loads(
        (precomputed[0] / "latents.json").read_text())
    for name in ("train-00001.array_record", "test-00001.array_record"):
        assert (out / name).read_bytes() == (precomputed[0] / name).read_bytes()
    other = tiny_config(("data.image_size", "16"))
    with pytest.raises(ValueError, match=r"other settings \(image_size: 32 there, 16 now\)"):
        precompute.plan_webdataset(str(root / "{00000..00002}.tar"), out, other.data, tokenizer,
                                   frozen_towers.describe(other))


def test_two_processes_take_disjoint_shards_and_the_last_one_finalizes(shards, precomputed, tmp_path):
    root, _, _ = shards
    out = tmp_path / "latents"
    spec = str(root / "{00000..00002}.tar")
    first = cli("--from", "webdataset", spec, "--out", str(out), "--process-index", "1",
                "--process-count", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in out.glob("shard-*.json")) == ["shard-00001.json"]
    assert not (out / "latents.json").exists() and "when every shard is finished" in first.stdout
    second = cli("--from", "webdataset", spec, "--out", str(out), "--process-index", "0",
                 "--process-count", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from 2 shards" in second.stdout and "wrote" in second.stdout
    assert json.loads((out / "latents.json").read_text()) == json.loads(
        (precomputed[0] / "latents.json").read_text())
    for path in precomputed[0].glob("*.array_record"):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize("args, message", [
    (("SPEC_MISSING", "--out", "OUT"), "matches no file"),
    (("SPEC", "--out", "/proc/no_such_dir"), "cannot write there"),
    (("SPEC", "--out", "gs://b/latents"), "local disk"),
    (("/d/{0..2.tar", "--out", "OUT"), "unbalanced braces"),
    (("SPEC", "--out", "OUT", "--process-index", "0"), "go together"),
])
def test_bad_input_is_one_line_before_any_work(shards, tmp_path, args, message):
    root, _, _ = shards
    fill = {"SPEC": str(root / "{00000..00002}.tar"), "SPEC_MISSING": str(root / "{00005..00009}.tar"),
            "OUT": str(tmp_path / "out")}
    result = cli("--from", "webdataset", *(fill.get(a, a) for a in args), timeout=120)
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out" / "latents.json").exists()


# ----------------------------------------------------------------------------- training


def test_training_from_the_precomputed_latents_resumes_exactly(precomputed, tmp_path):
    from diffusion_jax.training import trainer

    out, _ = precomputed
    config = tiny_config(("data.source", "latents"), ("data.path", str(out)),
                         ("training.steps", "4"), ("checkpoint.every_steps", "2"),
                         ("eval_every_steps", "2"))
    summary = trainer.train(config, tmp_path / "run")
    assert summary["diffusion_eval_loss"] > 0 and "vae_scaling_factor" not in summary
    assert checkpoint.steps(tmp_path / "run" / "checkpoints") == [2, 4]
    # As if stopped after step 2: drop the last checkpoint, rerun, get the same weights.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    trainer.train(tiny_config(("data.source", "latents"), ("data.path", str(out)),
                              ("training.steps", "4"), ("checkpoint.every_steps", "2"),
                              ("eval_every_steps", "2")), tmp_path / "resumed")
    items = lambda w: checkpoint.load(w / "checkpoints", items=["unet", "unet_ema", "optimizer"])[0]
    jax.tree.map(np.testing.assert_array_equal, items(tmp_path / "resumed"), items(tmp_path / "run"))

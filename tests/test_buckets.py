"""Aspect-ratio buckets (data/buckets.py): the bucket list, nearest-bucket assignment, the
cover-resize and crop with its micro-conditioning, batches from one bucket chosen from (seed,
step), exact resume, and processes that agree on every batch's bucket."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import system
from diffusion_jax.config_files import load as load_config_file
from diffusion_jax.data import buckets, input_pipeline, precompute, sources
from diffusion_jax.tokenizer import CLIPTokenizer
from diffusion_jax.training import preflight
from test_data import assert_batches_equal, take

REPO = Path(__file__).resolve().parent.parent

# SDXL's published training resolutions near 1024x1024 (the SDXL paper's appendix), as (h, w).
SDXL_BUCKETS = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
                (1344, 768), (768, 1344)}
# (height, width) of the test folder's images: tall, square, wide, very wide.
FOLDER_SIZES = [(60, 36)] * 4 + [(40, 40)] * 6 + [(36, 60)] * 5 + [(30, 90)] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.bundled(max_length=16)


def bucket_config(**overrides):
    c = input_pipeline.default_data_config()
    c.buckets.update(dict(pixels=32 * 32, step=8, max_aspect=3.0))
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def aspect_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("aspects")
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(FOLDER_SIZES):
        pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"picture {chr(ord('a') + i)}")
    return root


def folder_config(root, **overrides):
    settings = dict(source="folder", path=str(root), eval_fraction=0.0, batch_size=4,
                    random_crop=True)
    return bucket_config(**{**settings, **overrides})


def sdxl_time_ids(size):
    return functools.partial(system.time_ids, 6, target_size=size)


# ----------------------------------------------------------------------------- the bucket list


def test_sizes_near_the_budget_hold_sdxls_resolutions():
    c = bucket_config()
    c.buckets.update(dict(pixels=1024 * 1024, step=64, max_aspect=2.0))
    sizes = buckets.bucket_sizes(c.buckets)
    assert SDXL_BUCKETS <= set(sizes)
    for height, width in sizes:
        assert height % 64 == 0 and width % 64 == 0
        assert height * width <= 1024 * 1024  # the widest (or tallest) that fits
        assert max(height * (width + 64), (height + 64) * width) > 1024 * 1024
        assert max(height, width) <= 2 * min(height, width)
    aspects = [w / h for h, w in sizes]
    assert aspects == sorted(aspects) and (640, 1536) not in sizes  # 2.4:1 is over max_aspect
    assert set(sizes) == {(w, h) for h, w in sizes}
    assert buckets.largest(sizes) == (1024, 1024)


def test_explicit_sizes_and_bad_settings():
    c = bucket_config()
    c.buckets.sizes = ((32, 32), (24, 40))
    assert buckets.bucket_sizes(c.buckets) == ((32, 32), (24, 40))
    with pytest.raises(ValueError, match=r"data.buckets.sizes has \(24, 36\).*multiples of 8"):
        buckets.check_config(bucket_config(buckets=dict(sizes=((24, 36),))).buckets, 8)
    with pytest.raises(ValueError, match="data.buckets.step=12 must be a positive multiple of 8"):
        buckets.check_config(bucket_config(buckets=dict(step=12)).buckets, 8)
    with pytest.raises(ValueError, match="data.buckets.max_aspect=0.5 must be >= 1"):
        buckets.check_config(bucket_config(buckets=dict(max_aspect=0.5)).buckets)
    with pytest.raises(ValueError, match="data.buckets.pixels=32 is below"):
        buckets.check_config(bucket_config(buckets=dict(pixels=32)).buckets)
    assert not buckets.enabled(input_pipeline.default_data_config().buckets)


def test_nearest_bucket_is_the_closest_log_aspect_ratio():
    sizes = buckets.bucket_sizes(bucket_config(buckets=dict(pixels=64 * 64, max_aspect=4.0)).buckets)
    images = np.random.default_rng(1).integers(8, 400, (500, 2))
    chosen = buckets.nearest(images, sizes)
    distance = lambda image, size: abs(np.log(image[1] / image[0]) - np.log(size[1] / size[0]))
    for image, index in zip(images, chosen):
        best = min(distance(image, size) for size in sizes)
        assert distance(image, sizes[index]) == pytest.approx(best, abs=1e-12)
    # 2:1 and 1:2 are mirror images: buckets mirrored about the square.
    tall, wide = buckets.nearest([(80, 40), (40, 80)], sizes)
    assert sizes[tall] == sizes[wide][::-1]


def test_a_bucket_with_too_few_images_moves_them_to_the_next_nearest():
    sizes = ((48, 24), (32, 32), (24, 40))
    images = [(32, 32)] * 5 + [(24, 41)] * 3 + [(50, 24)]
    np.testing.assert_array_equal(buckets.assign(images, sizes), [1] * 5 + [2] * 3 + [0])
    # Two processes: the lone tall image joins the square bucket, the wide ones stay.
    np.testing.assert_array_equal(buckets.assign(images, sizes, min_count=2), [1] * 5 + [2] * 3 + [1])


def test_sizes_read_from_file_headers_are_those_decoding_gives(tmp_path):
    from diffusion_jax.data import sources

    rng = np.random.default_rng(4)
    rotated = Image.fromarray(rng.integers(0, 256, (20, 50, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # a phone photo held upright: stored 50 wide, shown 50 tall
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(tmp_path / "plain.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    source = sources.FolderSource(str(tmp_path), held_out_split=False, eval_fraction=0.0)
    sizes = buckets.image_sizes(source)
    for size, index in zip(sizes, range(len(source))):
        example = source[index]
        if isinstance(example, sources.Skipped):
            assert tuple(size) == (1, 1)  # counted as square; decoding skips it
        else:
            assert tuple(size) == example.image.shape[:2]
    assert sorted(map(tuple, sizes)) == [(1, 1), (30, 40), (50, 20)]


# ----------------------------------------------------------------------------- resize and crop


def test_cover_resize_and_crop_to_a_bucket():
    image = np.random.default_rng(2).integers(0, 256, (60, 100, 3), np.uint8)
    fitted, upscaled, crop = input_pipeline.fit_image(image, (32, 64), None)
    resized = np.asarray(Image.fromarray(image).resize((64, 38), Image.BICUBIC))  # 0.64 x
    assert fitted.shape == (32, 64, 3) and not upscaled and crop == (3, 0)
    np.testing.assert_array_equal(fitted, resized[3:35])
    fitted, _, crop = input_pipeline.fit_image(image, (32, 64), 0.999)  # the far end
    assert crop == (6, 0)
    np.testing.assert_array_equal(fitted, resized[6:38])
    _, upscaled, _ = input_pipeline.fit_image(image, (80, 40), None)
    assert upscaled
    square, _, square_crop = input_pipeline.fit_image(image, 32, None)
    same, _, same_crop = input_pipeline.fit_image(image, (32, 32), None)
    np.testing.assert_array_equal(square, same)
    assert square_crop == same_crop == (0, 10)  # 53 wide after the resize


# ----------------------------------------------------------------------------- batches


def test_batches_come_from_one_bucket_with_its_micro_conditioning(aspect_folder, tokenizer):
    c = folder_config(aspect_folder)
    iterator = buckets.make_train_iterator(c, tokenizer, time_ids_for=sdxl_time_ids)
    sizes = {b.size: b.population for b in iterator.buckets}
    assert sizes == {(40, 24): 4, (32, 32): 6, (24, 40): 5, (16, 48): 3}
    seen = {}
    for batch in take(iterator, 40):
        height, width = batch["image"].shape[1:3]
        assert (height, width) in sizes and batch["image"].shape[0] == 4
        seen[height, width] = seen.get((height, width), 0) + 1
        ids = batch["time_ids"]
        np.testing.assert_array_equal(ids[:, 4:], [[height, width]] * 4)  # the target: the bucket
        np.testing.assert_array_equal(ids[:, :2], batch["original_size"])
        np.testing.assert_array_equal(ids[:, 2:4], batch["crop_top_left"])
        for (h, w), (top, left) in zip(batch["original_size"], batch["crop_top_left"]):
            assert buckets.nearest([(h, w)], list(sizes))[0] == list(sizes).index((height, width))
            scale = max(height / h, width / w)  # the crop lies inside the resized image
            assert 0 <= top <= round(h * scale) - height and 0 <= left <= round(w * scale) - width
    assert set(seen) == set(sizes)  # every bucket drawn, by population
    assert seen[32, 32] > seen[16, 48]


def test_exact_resume_and_the_same_batches_from_a_fresh_iterator(aspect_folder, tokenizer):
    c = folder_config(aspect_folder, caption_dropout=0.3)
    original = buckets.make_train_iterator(c, tokenizer, time_ids_for=sdxl_time_ids)
    first = take(original, 5)
    state = json.loads(json.dumps(original.get_state()))  # what a checkpoint stores
    expected = take(original, 7)
    restored = buckets.make_train_iterator(c, tokenizer, time_ids_for=sdxl_time_ids)
    restored.set_state(state)
    assert_batches_equal(take(restored, 7), expected)
    assert restored.stats == original.stats
    again = buckets.make_train_iterator(c, tokenizer, time_ids_for=sdxl_time_ids)
    assert_batches_equal(take(again, 5), first)
    other = buckets.make_train_iterator(folder_config(aspect_folder, seed=1), tokenizer)
    assert [b["image"].shape for b in take(other, 12)] != [
        b["image"].shape for b in first + expected]


def test_processes_agree_on_each_batchs_bucket_and_read_disjoint_images(aspect_folder,
                                                                        tokenizer):
    c = folder_config(aspect_folder, batch_size=4, random_crop=False, random_flip=False,
                      caption_dropout=0.0)
    shards = [buckets.make_train_iterator(c, tokenizer, process_index=i, process_count=2)
              for i in range(2)]
    for _ in range(6):
        halves = [next(shard) for shard in shards]
        assert halves[0]["image"].shape == halves[1]["image"].shape
        assert halves[0]["image"].shape[0] == 2  # batch_size // process_count
        for a in halves[0]["input_ids"]:  # each caption names one image: no image on both
            assert not any(np.array_equal(a, b) for b in halves[1]["input_ids"])


def test_resume_across_buckets_on_and_off_is_refused(aspect_folder, tokenizer):
    flat = folder_config(aspect_folder)
    flat.buckets.pixels = 0
    flat.image_size = 32
    state = input_pipeline.make_train_iterator(flat, tokenizer).get_state()
    with pytest.raises(ValueError, match="buckets was None"):
        buckets.make_train_iterator(folder_config(aspect_folder), tokenizer).set_state(state)
    state = buckets.make_train_iterator(folder_config(aspect_folder), tokenizer).get_state()
    with pytest.raises(ValueError, match="differently shaped pipeline: buckets was"):
        input_pipeline.make_train_iterator(flat, tokenizer).set_state(state)


def test_sources_without_sizes_and_workers_are_refused(tokenizer):
    with pytest.raises(ValueError, match="num_workers=2: with data.buckets"):
        buckets.make_train_iterator(bucket_config(num_workers=2), tokenizer)
    with pytest.raises(ValueError, match="TfdsSource does not give"):
        buckets.image_sizes(type("TfdsSource", (), {"__len__": lambda self: 1})())


def test_latents_written_per_bucket_train_in_their_buckets(aspect_folder, tokenizer, tmp_path):
    """precompute.write_latents with buckets: one file per bucket of the training split (the
    held-out split square, as the trainer evaluates), read back one bucket per batch."""
    images = folder_config(aspect_folder, eval_fraction=0.3)
    encode = lambda batch: batch[:, ::8, ::8, :] * 2.0  # a stand-in VAE: 8x down, any values
    meta = precompute.write_latents(encode, None, images, tokenizer, tmp_path / "latents",
                                    time_ids=sdxl_time_ids((32, 32)))
    expected = {key: [encode(row["image"][None])[0] for row in rows]
                for key, (rows, _) in buckets.iterate_buckets(images, tokenizer, "train",
                                                               sdxl_time_ids)}
    assert meta["buckets"]["train"] == {key: [f"train-{key}.array_record"] for key in expected}
    assert meta["files"]["test"] == ["test.array_record"]
    latents = bucket_config(source="latents", path=str(tmp_path / "latents"), batch_size=4)
    iterator = buckets.make_train_iterator(latents, tokenizer, time_ids_for=sdxl_time_ids)
    for batch in take(iterator, 8):
        height, width = batch["latents"].shape[1] * 8, batch["latents"].shape[2] * 8
        np.testing.assert_array_equal(batch["time_ids"][:, 4:], [[height, width]] * 4)
        for row in batch["latents"]:  # each row: an image encoded at its bucket
            assert any(np.array_equal(row, e) for e in expected[f"{height}x{width}"])
    state = json.loads(json.dumps(iterator.get_state()))
    after = take(iterator, 4)
    restored = buckets.make_train_iterator(latents, tokenizer, time_ids_for=sdxl_time_ids)
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), after)


def test_webdataset_shards_precompute_into_buckets(aspect_folder, tokenizer, tmp_path):
    """plan_webdataset + encode_shards with data.buckets: each training image encoded at its
    nearest bucket, one file per bucket and shard; the held-out split square; the records
    keep each image's size and crop; training reads them back in their buckets; a rerun with
    other buckets is refused."""
    from test_webdataset import write_tar

    files = sorted(aspect_folder.glob("*.png"))
    for shard, half in enumerate((files[::2], files[1::2])):
        write_tar(tmp_path / f"{shard:05d}.tar", [
            (f"{shard}{path.stem}.{ext}", (path.with_suffix(f".{ext}")).read_bytes())
            for path in half for ext in ("png", "txt")])
    config = bucket_config(eval_fraction=0.25, batch_size=4)
    encode = lambda batch: batch[:, ::8, ::8, :] * 2.0  # a stand-in VAE: 8x down, any values
    text_fn = lambda ids: {"context": np.ones((len(ids["input_ids"]), 16, 2), np.float32)}
    spec, out = str(tmp_path / "{00000..00001}.tar"), tmp_path / "latents"
    plan = precompute.plan_webdataset(spec, out, config, tokenizer, {})
    result = precompute.encode_shards(plan, encode, text_fn, tokenizer, sdxl_time_ids((32, 32)))
    assert result["finalized"] and result["written"] == len(files)
    meta = json.loads((out / sources.LATENTS_META).read_text())
    sizes = buckets.bucket_sizes(config.buckets)
    expected = {}  # bucket "HxW" -> {(original size, crop): latents} of its training images
    for shard, half in enumerate((files[::2], files[1::2])):
        for path in half:
            if sources.held_out(f"{shard}{path.stem}", config.eval_fraction):
                continue
            image = np.asarray(Image.open(path).convert("RGB"))
            size = sizes[int(buckets.nearest([image.shape[:2]], sizes)[0])]
            fitted, _, crop = input_pipeline.fit_image(image, size, None)
            latents = encode(fitted[None].astype(np.float32) / 127.5 - 1.0)[0]
            expected.setdefault(buckets.bucket_key(size), []).append(
                (image.shape[:2], tuple(crop), latents))
    assert sorted(meta["buckets"]["train"]) == sorted(expected) and len(expected) > 1
    for key, rows in expected.items():
        assert meta["buckets"]["train"][key] == [
            f"train-{key}-{i:05d}.array_record" for i in range(2)
            if (out / f"train-{key}-{i:05d}.array_record").exists()]
        source = sources.LatentsSource(str(out), "train", bucket=key)
        records = sorted((source[i] for i in range(len(source))),
                         key=lambda r: r["latents"].tobytes())
        rows = sorted(rows, key=lambda r: r[2].tobytes())
        assert len(records) == len(rows)
        for record, (original, crop, latents) in zip(records, rows):
            np.testing.assert_allclose(record["latents"], latents, atol=1e-6)  # 1/127.5 rounding
            np.testing.assert_array_equal(record["original_size"], original)
            np.testing.assert_array_equal(record["crop_top_left"], crop)
    held = sources.LatentsSource(str(out), "test")
    assert {held[i]["latents"].shape for i in range(len(held))} == {(4, 4, 3)}  # 32x32, 8x down
    latents = bucket_config(source="latents", path=str(out), batch_size=2)
    for batch in take(buckets.make_train_iterator(latents, tokenizer,
                                                  time_ids_for=sdxl_time_ids), 6):
        height, width = batch["latents"].shape[1] * 8, batch["latents"].shape[2] * 8
        assert f"{height}x{width}" in expected
        np.testing.assert_array_equal(batch["time_ids"][:, 4:], [[height, width]] * 2)
    other = bucket_config(eval_fraction=0.25, batch_size=4)
    other.buckets.max_aspect = 2.0
    with pytest.raises(ValueError, match=r"other settings \(buckets: "):
        precompute.plan_webdataset(spec, out, other, tokenizer, {})


# ----------------------------------------------------------------------------- training

TINY = REPO / "configs" / "tiny_train.py"
# Whole bucketed runs (one compile per bucket, SIGKILL and exact resume, 1 vs 8 devices) are
# test_training.py's tiny SDXL runs, on a folder of tall and wide images.


def test_the_preflight_lowers_the_largest_bucket_and_checks_its_sides():
    config = load_config_file(TINY)
    config.data.buckets.update(dict(pixels=32 * 32, step=8, max_aspect=2.0))
    config.data.batch_size = 4
    assert preflight.batch_shapes(config, "diffusion")["image"].shape == (4, 32, 32, 3)
    config.data.buckets.sizes = ((24, 40), (48, 32), (32, 32))
    assert preflight.batch_shapes(config, "diffusion")["image"].shape == (4, 48, 32, 3)
    config.data.buckets.sizes = ((24, 36),)
    with pytest.raises(ValueError, match=r"\(24, 36\).*multiples of 8"):
        preflight.check_config(config)
    config.data.buckets.sizes = ()
    config.data.num_workers = 2
    with pytest.raises(ValueError, match="data.num_workers=2.*threads"):
        preflight.validate(config)


def test_sdxl_finetune_passes_the_preflight_at_its_largest_bucket(tmp_path):
    """configs/sdxl_finetune.py trains in SDXL's buckets near 1024x1024 from latents written
    in them; the preflight lowers the largest and refuses latents of other buckets."""
    from test_preflight import _latents_folder, _stub_checkpoint

    config = load_config_file(REPO / "configs" / "sdxl_finetune.py")
    assert SDXL_BUCKETS <= set(buckets.bucket_sizes(config.data.buckets))
    config.init_from = str(_stub_checkpoint(tmp_path / "ckpt", config))
    config.data.path = str(_latents_folder(tmp_path / "latents", config, 1024))
    preflight.validate(config)
    shapes = preflight.batch_shapes(config, "diffusion")
    assert shapes["latents"].shape == (32, 128, 128, 4)  # 1024x1024: the most pixels
    assert shapes["time_ids"].shape == (32, 6)
    config.data.buckets.max_aspect = 1.2  # 832x1216 is no bucket of these settings
    with pytest.raises(ValueError, match="hold buckets it does not list .*832x1216"):
        preflight.validate(config)
    config.data.buckets.pixels = 0
    with pytest.raises(ValueError, match="were written in aspect buckets"):
        preflight.validate(config)

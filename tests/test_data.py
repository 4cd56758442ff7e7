"""Data sources and the grain pipeline: shapes and ranges, bad input, captions, dropout, exact
resume, per-host shards, epochs, errors, tfds, precomputed latents, throughput."""

import json
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import fashion_mnist, input_pipeline, precompute, sources
from diffusion_jax.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.bundled(max_length=16)  # short rows keep the tests fast


def config(**overrides):
    c = input_pipeline.default_data_config()
    c.update(overrides)
    return c


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def captions(tokenizer, batch):
    return tokenizer.decode(batch["input_ids"])


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def noise_image(seed, width, height, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def picture(i):
    """A distinct caption per image that decodes back unchanged (CLIP splits digits apart)."""
    return "picture " + chr(ord("a") + i % 26) * (1 + i // 26)


def captioned_folder(root, n):
    """n distinct RGB images, the caption of image i is picture(i) (in captions.jsonl)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            save(noise_image(i, 40, 36), root / f"img{i:02d}.png")
            f.write(json.dumps({"file": f"img{i:02d}.png", "caption": picture(i)}) + "\n")
    return root


def bad_input_folder(root):
    """Each bad-input case once, beside 4 good images; returns the expected counts."""
    for i in range(4):
        save(noise_image(i, 48, 40), root / "good" / f"ok{i}.png")
        (root / "good" / f"ok{i}.txt").write_text(f"good picture {i}")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image")
    png = (root / "good" / "ok0.png").read_bytes()
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    data = png.index(b"IDAT") + 4
    (root / "corrupt.png").write_bytes(png[:data + 50] + bytes(100) + png[data + 150:])  # bad pixel data
    save(Image.fromarray(np.full((40, 40), 77, np.uint8), "L"), root / "gray.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 20:, 3] = 255  # left half fully transparent (-> white), right half opaque red
    save(Image.fromarray(rgba, "RGBA"), root / "rgba.png")
    save(noise_image(9, 40, 40).convert("P"), root / "palette.png")
    save(Image.fromarray(np.full((40, 40), 65535, np.uint16)), root / "deep16.png")
    save(noise_image(10, 8, 6), root / "small.png")
    (root / "README.md").write_text("not data")  # other extensions are ignored
    return {"skipped": {"corrupt": 1, "empty_file": 1, "not_an_image": 1, "truncated": 1},
            "converted": {"16bit": 1, "alpha": 1, "grayscale": 2, "missing_caption": 5,
                          "palette": 1, "upscaled": 1},
            "examples": 9}


# --- Fashion-MNIST --------------------------------------------------------------------------

def test_fashion_mnist_batches(tokenizer):
    it = input_pipeline.make_train_iterator(config(caption_dropout=0.0), tokenizer)
    batch = next(it)
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["input_ids"].shape == (64, 16) and batch["input_ids"].dtype == np.int32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() > 0.9  # background and garment
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray -> RGB
    expected_ids = tokenizer([fashion_mnist.caption(label) for label in batch["label"]])
    np.testing.assert_array_equal(batch["input_ids"], expected_ids)
    assert it.len_dataset == 60000 and it.stats == {"examples": 64, "skipped": {}, "converted": {}}


def test_fashion_mnist_resize_is_pil_bicubic():
    images, _ = fashion_mnist.load("test")
    resized = sources.resized_fashion_mnist("test", 32)
    reference = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC))
                          for a in images[:300]])
    assert np.abs(resized[:300].astype(int) - reference).max() <= 1  # PIL's fixed-point rounding


def test_fashion_mnist_eval_batches_deterministic(tokenizer):
    c = config(random_flip=True, caption_dropout=0.5)  # eval ignores both
    batches = input_pipeline.make_eval_batches(c, tokenizer, num_examples=100, batch_size=32)
    assert len(batches) == 3 and all(b["image"].shape == (32, 32, 32, 3) for b in batches)
    images, labels = fashion_mnist.load("test")
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[:96])
    first = sources.resized_fashion_mnist("test", 32)[0].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(batches[0]["image"][0, ..., 1], first, atol=1e-6)
    np.testing.assert_array_equal(batches[0]["input_ids"],
                                  tokenizer([fashion_mnist.caption(l) for l in labels[:32]]))
    assert_batches_equal(batches, input_pipeline.make_eval_batches(c, tokenizer, num_examples=100, batch_size=32))


def test_caption_dropout_rate_and_determinism(tokenizer):
    c = config(caption_dropout=0.3, seed=7)
    batches = take(input_pipeline.make_train_iterator(c, tokenizer), 20)
    empty = tokenizer([""])[0]
    dropped = np.concatenate([np.all(b["input_ids"] == empty, axis=1) for b in batches])
    assert abs(dropped.mean() - 0.3) < 0.05, dropped.mean()  # 1280 draws: 4 standard deviations
    assert_batches_equal(batches[:3], take(input_pipeline.make_train_iterator(c, tokenizer), 3))
    other_seed = next(input_pipeline.make_train_iterator(config(caption_dropout=0.3, seed=8), tokenizer))
    assert not np.array_equal(other_seed["label"], batches[0]["label"])


def test_exact_resume_fashion_mnist(tokenizer):
    c = config(batch_size=16)
    original = input_pipeline.make_train_iterator(c, tokenizer)
    take(original, 3)
    state = json.loads(json.dumps(original.get_state()))  # what a checkpoint stores
    expected = take(original, 4)
    restored = input_pipeline.make_train_iterator(c, tokenizer)
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), expected)
    assert restored.stats == original.stats


def test_resume_rejects_a_differently_shaped_pipeline(tokenizer):
    state = input_pipeline.make_train_iterator(config(batch_size=16), tokenizer).get_state()
    with pytest.raises(ValueError, match="batch_size was 16, now 32"):
        input_pipeline.make_train_iterator(config(batch_size=32), tokenizer).set_state(state)


# --- image folder ---------------------------------------------------------------------------

def test_folder_bad_input_is_skipped_or_converted_and_counted(tmp_path, tokenizer, caplog):
    expected = bad_input_folder(tmp_path)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, caption_dropout=0.0)
    rows, counter = input_pipeline.iterate_split(c, tokenizer, "train", held_out=False)
    rows = list(rows)
    assert counter.as_dict() == expected
    assert {f"good picture {i}" for i in range(4)} <= {tokenizer.decode(r["input_ids"]) for r in rows}
    assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.float32 for r in rows)
    skipped_names = {r.getMessage().split(":")[0] for r in caplog.records if "skipped" in r.getMessage()}
    assert skipped_names == {f"skipped {n}" for n in ("empty.jpg", "notes.png", "truncated.png", "corrupt.png")}

    # the training iterator never stops on them, fills every batch and counts by reason
    it = input_pipeline.make_train_iterator(config(source="folder", path=str(tmp_path), eval_fraction=0.0,
                                             batch_size=6), tokenizer)
    assert it.len_dataset == 13
    batches = take(it, 6)  # 36 rows: four epochs of 9 usable images
    assert all(b["image"].shape == (6, 32, 32, 3) for b in batches)
    assert all(-1.0 <= b["image"].min() and b["image"].max() <= 1.0 for b in batches)
    assert np.all(np.concatenate([b["label"] for b in batches]) == -1)
    stats = it.stats
    assert stats["examples"] == 36
    assert set(stats["skipped"]) == set(expected["skipped"])
    assert all(3 <= n <= 5 for n in stats["skipped"].values()), stats  # once per epoch seen
    assert stats["converted"]["upscaled"] == 4


def test_min_image_size_skips_small_images_as_too_small(tmp_path, tokenizer):
    expected = bad_input_folder(tmp_path)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, min_image_size=40)
    rows, counter = input_pipeline.iterate_split(c, tokenizer, "train", held_out=False)
    assert len(list(rows)) == expected["examples"] - 1  # small.png, 8x6
    assert counter.as_dict()["skipped"] == {**expected["skipped"], "too_small": 1}
    assert "upscaled" not in counter.as_dict()["converted"]
    with pytest.raises(ValueError, match="min_image_size"):
        input_pipeline.make_train_iterator(config(min_image_size=-1), tokenizer)


def test_folder_conversions_pixel_values(tmp_path, tokenizer):
    bad_input_folder(tmp_path)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0)
    source = input_pipeline.make_source(c, "train")
    prepare = input_pipeline.make_prepare(c, tokenizer, source)
    by_name = {source.files[i]: prepare(source[i]) for i in range(len(source))}
    assert isinstance(by_name["empty.jpg"], sources.Skipped)
    gray = by_name["gray.png"].arrays["image"]
    np.testing.assert_allclose(gray, 77 / 127.5 - 1, atol=1e-6)  # all three channels
    rgba = by_name["rgba.png"].arrays["image"]
    np.testing.assert_allclose(rgba[:, :12], 1.0)  # transparent -> white
    np.testing.assert_allclose(rgba[:, 20:], np.broadcast_to([1.0, -1.0, -1.0], (32, 12, 3)))
    np.testing.assert_allclose(by_name["deep16.png"].arrays["image"], 1.0)  # 65535 -> 255
    assert by_name["small.png"].conversions == ("missing_caption", "upscaled")
    assert by_name["palette.png"].conversions == ("missing_caption", "palette")


def test_folder_captions_from_jsonl_csv_and_txt(tmp_path, tokenizer):
    for i, name in enumerate(["a.png", "sub/b.jpg", "sub/deeper/c.png", "d.png"]):
        save(noise_image(i, 32, 32), tmp_path / name)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "from jsonl"}\n\n')
    (tmp_path / "captions.csv").write_text('file,caption\nsub/b.jpg,"from csv, quoted"\n')
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("from txt\n")
    (tmp_path / "a.txt").write_text("the captions file wins")
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0)
    rows, counter = input_pipeline.iterate_split(c, tokenizer, "train", held_out=False)
    np.testing.assert_array_equal(  # in path order: a, d, sub/b, sub/deeper/c
        np.stack([r["input_ids"] for r in rows]),
        tokenizer(["from jsonl", "", "from csv, quoted", "from txt"]))
    assert counter.converted == {"missing_caption": 1}


@pytest.mark.parametrize("random_crop", [False, True])
def test_random_flip_and_crop(tmp_path, tokenizer, random_crop):
    captioned_folder(tmp_path, 10)  # 40x36 images: resized to 36x32, 4 columns of crop slack
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, batch_size=10,
               caption_dropout=0.0, random_crop=random_crop)
    source = input_pipeline.make_source(c, "train")
    by_caption = {picture(i): source[i].image for i in range(10)}
    flips, offsets = [], set()
    for batch in take(input_pipeline.make_train_iterator(c, tokenizer), 8):
        for caption, row in zip(captions(tokenizer, batch), batch["image"]):
            resized = np.asarray(Image.fromarray(by_caption[caption]).resize((36, 32), Image.BICUBIC))
            resized = resized.astype(np.float32) / 127.5 - 1
            matches = [(left, flip) for left in range(5) for flip in (False, True)
                       if np.allclose(row, resized[:, left:left + 32][:, ::-1 if flip else 1], atol=1e-6)]
            assert len(matches) == 1
            offsets.add(matches[0][0])
            flips.append(matches[0][1])
    assert 0.35 < np.mean(flips) < 0.65  # 80 rows
    assert offsets == ({0, 1, 2, 3, 4} if random_crop else {2})


def sdxl_time_ids(original_size, crop_top_left):
    """SDXL base's numbers at a 32x32 training resolution (trainer.time_ids_fn's for it)."""
    return np.float32([*original_size, *crop_top_left, 32, 32])


@pytest.mark.parametrize("random_crop", [False, True])
def test_rows_carry_the_original_size_crop_and_time_ids(tmp_path, tokenizer, random_crop):
    """As SDXL's training scripts record them: (h, w) before the resize, (top, left) of the
    crop in the resized image; time_ids built from them per row."""
    captioned_folder(tmp_path, 6)  # 40x36 images: resized to 36x32, 4 columns of crop slack
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, batch_size=6,
               caption_dropout=0.0, random_flip=False, random_crop=random_crop)
    source = input_pipeline.make_source(c, "train")
    by_caption = {picture(i): source[i].image for i in range(6)}
    lefts = set()
    for batch in take(input_pipeline.make_train_iterator(c, tokenizer, time_ids=sdxl_time_ids), 4):
        assert batch["time_ids"].shape == (6, 6) and batch["time_ids"].dtype == np.float32
        np.testing.assert_array_equal(batch["original_size"], np.tile([36, 40], (6, 1)))
        for caption, row, (top, left) in zip(captions(tokenizer, batch), batch["image"],
                                             batch["crop_top_left"]):
            resized = np.asarray(Image.fromarray(by_caption[caption]).resize((36, 32), Image.BICUBIC))
            np.testing.assert_allclose(row, resized[top:top + 32, left:left + 32] / 127.5 - 1,
                                       atol=1e-6)
            lefts.add(int(left))
        np.testing.assert_array_equal(batch["time_ids"], np.concatenate(
            [batch["original_size"], batch["crop_top_left"], np.full((6, 2), 32)], 1))
    assert lefts == ({0, 1, 2, 3, 4} if random_crop else {2})
    rows, _ = input_pipeline.iterate_split(c, tokenizer, "train", held_out=False,
                                           time_ids=sdxl_time_ids)  # as eval batches: centred
    np.testing.assert_array_equal(next(rows)["time_ids"], [36, 40, 0, 2, 32, 32])
    assert "time_ids" not in next(input_pipeline.make_train_iterator(c, tokenizer))  # SD: none


def test_folder_malformed_captions_file_is_an_error(tmp_path, tokenizer):
    captioned_folder(tmp_path, 2)
    with open(tmp_path / "captions.jsonl", "a") as f:
        f.write('{"file": "img00.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:3: expected a JSON object"):
        input_pipeline.make_train_iterator(config(source="folder", path=str(tmp_path)), tokenizer)


def test_exact_resume_folder_with_skips_and_random_crop(tmp_path, tokenizer):
    bad_input_folder(tmp_path)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, batch_size=4, random_crop=True)
    original = input_pipeline.make_train_iterator(c, tokenizer)
    take(original, 5)
    state = json.loads(json.dumps(original.get_state()))
    expected = take(original, 6)
    restored = input_pipeline.make_train_iterator(c, tokenizer)
    restored.set_state(state)
    assert_batches_equal(take(restored, 6), expected)
    assert restored.stats == original.stats


def test_epochs_have_different_orders(tmp_path, tokenizer):
    captioned_folder(tmp_path, 10)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, batch_size=10,
               caption_dropout=0.0, random_flip=False)
    epochs = [captions(tokenizer, b) for b in take(input_pipeline.make_train_iterator(c, tokenizer), 3)]
    assert all(sorted(e) == [picture(i) for i in range(10)] for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_process_shards_are_disjoint_and_cover_the_data(tmp_path, tokenizer):
    captioned_folder(tmp_path, 11)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.0, batch_size=4, caption_dropout=0.0)
    seen = []
    for index in range(2):
        it = input_pipeline.make_train_iterator(c, tokenizer, process_index=index, process_count=2)
        assert next(it)["image"].shape[0] == 2  # the global batch split over the processes
        it = input_pipeline.make_train_iterator(c, tokenizer, process_index=index, process_count=2)
        epoch = sum((captions(tokenizer, b) for b in take(it, 3)), [])[:it.len_dataset]
        assert len(set(epoch)) == it.len_dataset  # one full epoch: each example once
        seen.append(set(epoch))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {picture(i) for i in range(11)}


def test_folder_held_out_split(tmp_path, tokenizer):
    captioned_folder(tmp_path, 40)
    c = config(source="folder", path=str(tmp_path), eval_fraction=0.25, caption_dropout=0.0)
    train = input_pipeline.make_source(c, "train")
    held = input_pipeline.make_source(c, "test", held_out=True)
    assert not set(train.files) & set(held.files) and len(train) + len(held) == 40
    assert 3 <= len(held) <= 17  # a hash split: about a quarter
    batches = input_pipeline.make_eval_batches(c, tokenizer, num_examples=100, batch_size=2)
    assert sum(b["image"].shape[0] for b in batches) == len(held) // 2 * 2
    assert set(sum((captions(tokenizer, b) for b in batches), [])) <= {
        picture(int(f[3:5])) for f in held.files}


def test_all_bad_folder_is_an_error_not_a_hang(tmp_path, tokenizer):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("nope")
    it = input_pipeline.make_train_iterator(config(source="folder", path=str(tmp_path), eval_fraction=0.0,
                                             batch_size=2), tokenizer)
    with pytest.raises(RuntimeError, match="every example of the dataset was skipped"):
        next(it)


# --- construction errors --------------------------------------------------------------------

def a_file(root):
    (root / "file.png").write_text("x")
    return str(root / "file.png")


def only_text(root):
    (root / "notes.txt").write_text("no images here")
    return str(root)


@pytest.mark.parametrize("make_config, error, match", [
    (lambda p: config(source="folder", path=str(p / "missing")), FileNotFoundError, "does not exist"),
    (lambda p: config(source="folder", path=""), ValueError, "needs data.path"),
    (lambda p: config(source="folder", path=only_text(p)), ValueError, "holds no image files"),
    (lambda p: config(source="folder", path=a_file(p)), NotADirectoryError, "is a file"),
    (lambda p: config(source="webdataset"), ValueError, r"not a data source; use one of \['fashion_mnist'"),
    (lambda p: config(split="validation"), ValueError, "split 'validation' does not exist"),
    (lambda p: config(batch_size=63), ValueError, "multiple of the process count"),
    (lambda p: config(source="latents", path=str(p)), FileNotFoundError, "write_latents"),
])
def test_clear_errors_at_construction(tmp_path, tokenizer, make_config, error, match):
    with pytest.raises(error, match=match):
        input_pipeline.make_train_iterator(make_config(tmp_path), tokenizer, process_count=2)


# --- tfds -----------------------------------------------------------------------------------

def test_tfds_missing_names_the_install(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if absent
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        input_pipeline.make_train_iterator(config(source="tfds", path="mnist"), tokenizer)


def fake_tfds(records, features):
    """The slice of tensorflow_datasets the tfds source uses: data_source(name, split=...)."""
    class Source(list):
        dataset_info = types.SimpleNamespace(features=features)

    def data_source(name, *, split, download):
        assert not download
        if name != "fake":
            raise AssertionError(f"Dataset {name} not found")
        return Source(records[split])

    return types.SimpleNamespace(data_source=data_source)


def test_tfds_source_through_the_tfds_interface(monkeypatch, tokenizer):
    class_label = types.SimpleNamespace(names=["zero", "one", "two"])
    records = {"train": [{"image": np.full((28, 28, 1), 10 * i, np.uint8), "label": np.int64(i % 3)}
                         for i in range(8)],
               "test": [{"image": np.zeros((40, 30, 3), np.uint16), "label": np.int64(1)}] * 4}
    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        fake_tfds(records, {"image": None, "label": class_label}))
    c = config(source="tfds", path="fake", caption_dropout=0.0, random_flip=False, batch_size=8)
    batch = next(input_pipeline.make_train_iterator(c, tokenizer))
    assert batch["image"].shape == (8, 32, 32, 3)
    assert sorted(batch["label"]) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert captions(tokenizer, batch) == [f"a photo of {class_label.names[l]}" for l in batch["label"]]
    c.class_names, c.caption_template = ("nil", "uno", "dos"), "{} drawn"
    eval_batch = input_pipeline.make_eval_batches(c, tokenizer, num_examples=4, batch_size=4)[0]
    assert captions(tokenizer, eval_batch) == ["uno drawn"] * 4
    with pytest.raises(ValueError, match="data.image_key='img' is not a feature"):
        input_pipeline.make_train_iterator(config(source="tfds", path="fake", image_key="img"), tokenizer)
    with pytest.raises(FileNotFoundError, match="tfds build other"):
        input_pipeline.make_train_iterator(config(source="tfds", path="other"), tokenizer)


# --- precomputed latents --------------------------------------------------------------------

def fake_encode(images):
    """[B, 32, 32, 3] -> [B, 4, 4, 4]: 8x8 average pool plus a channel of the mean."""
    pooled = images.reshape(images.shape[0], 4, 8, 4, 8, 3).mean(axis=(2, 4))
    return np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1)


def fake_context(input_ids):
    return np.repeat(input_ids[..., None].astype(np.float32), 2, axis=-1)


def fake_text(ids):
    """The text towers' conditioning as frozen_towers.frozen_encoders gives it."""
    return {"context": fake_context(ids["input_ids"])}


def test_precomputed_latents_round_trip(tmp_path, tokenizer):
    captioned_folder(tmp_path / "images", 24)
    (tmp_path / "images" / "broken.png").write_bytes(b"")
    c = config(source="folder", path=str(tmp_path / "images"), eval_fraction=0.25, batch_size=8)
    meta = precompute.write_latents(fake_encode, fake_text, c, tokenizer, tmp_path / "latents")
    assert meta["splits"]["train"] + meta["splits"]["test"] == 24
    assert sum(sum(s.values()) for s in meta["skipped"].values()) == 1

    latent_config = config(source="latents", path=str(tmp_path / "latents"), batch_size=8,
                           caption_dropout=0.5)
    images = input_pipeline.make_eval_batches(c, tokenizer, num_examples=4, batch_size=2)
    latents = input_pipeline.make_eval_batches(latent_config, tokenizer, num_examples=4, batch_size=2)
    for image_batch, latent_batch in zip(images, latents):
        assert sorted(latent_batch) == ["context", "input_ids", "label", "latents"]
        np.testing.assert_allclose(latent_batch["latents"], fake_encode(image_batch["image"]), atol=1e-6)
        np.testing.assert_array_equal(latent_batch["input_ids"], image_batch["input_ids"])
        np.testing.assert_array_equal(latent_batch["context"], fake_context(image_batch["input_ids"]))

    it = input_pipeline.make_train_iterator(latent_config, tokenizer)
    assert it.len_dataset == meta["splits"]["train"]
    batches = take(it, 4)
    assert batches[0]["latents"].shape == (8, 4, 4, 4) and batches[0]["context"].shape == (8, 16, 2)
    ids = np.concatenate([b["input_ids"] for b in batches])
    context = np.concatenate([b["context"] for b in batches])
    dropped = np.all(ids == tokenizer([""])[0], axis=1)
    assert 0 < dropped.sum() < len(dropped)
    np.testing.assert_array_equal(context[dropped], np.broadcast_to(fake_context(tokenizer([""]))[0],
                                                                     context[dropped].shape))
    np.testing.assert_array_equal(context[~dropped], fake_context(ids[~dropped]))


# --- worker processes and throughput ----------------------------------------------------------

def test_worker_processes_yield_the_same_stream_and_resume(tokenizer):
    c = config(batch_size=16)
    expected = take(input_pipeline.make_train_iterator(c, tokenizer), 4)
    c.num_workers = 2
    it = input_pipeline.make_train_iterator(c, tokenizer)
    try:
        assert_batches_equal(take(it, 2), expected[:2])
        state = json.loads(json.dumps(it.get_state()))
        assert_batches_equal(take(it, 2), expected[2:])
        it.set_state(state)
        assert_batches_equal(take(it, 2), expected[2:])
    finally:
        it.close()


def test_fashion_mnist_throughput(tokenizer):
    """Batch 64 at 32x32 in-process: >= 3000 examples/s on an idle core of this CPU, asserted at
    a third of that (the test machine is shared); the trainer needs ~2000 at most."""
    it = input_pipeline.make_train_iterator(config(), CLIPTokenizer.bundled())
    take(it, 2)
    start = time.perf_counter()
    take(it, 40)
    rate = 40 * 64 / (time.perf_counter() - start)
    print(f"fashion_mnist iterator: {rate:.0f} examples/s")
    assert rate > 1000

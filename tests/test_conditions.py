"""ControlNet condition images from the data pipeline (data/conditions.py): aligned with
their image through resize, crop and flip; skipped when missing; part of the resume
fingerprint; Canny through OpenCV; errors before any data is read."""

import logging

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import conditions, input_pipeline
from diffusion_jax.tokenizer import CLIPTokenizer
from test_data import captioned_folder, config, take


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.bundled(max_length=16)


def folder_config(root, **overrides):
    settings = dict(source="folder", path=str(root), eval_fraction=0.0, batch_size=4,
                    caption_dropout=0.0, random_crop=True, random_flip=True)
    return config(**{**settings, **overrides})


def test_image_folder_condition_follows_the_crop_and_flip(tmp_path, tokenizer):
    """The condition files are the images themselves: every row's condition must be its
    image, pixel for pixel, whatever crop and flip the row drew."""
    images = captioned_folder(tmp_path / "images", 6)  # 40x36: 4 columns of crop slack
    (tmp_path / "cond").mkdir()
    for path in images.glob("*.png"):
        Image.open(path).save(tmp_path / "cond" / path.with_suffix(".jpg").name, quality=100)
        (tmp_path / "cond" / path.name).write_bytes(path.read_bytes())  # the exact name wins
    c = folder_config(images, condition="image_folder", condition_path=str(tmp_path / "cond"))
    for batch in take(input_pipeline.make_train_iterator(c, tokenizer), 6):
        assert batch["condition"].shape == (4, 32, 32, 3) and batch["condition"].dtype == np.float32
        np.testing.assert_allclose(batch["condition"], (batch["image"] + 1) / 2, atol=1e-6)


def test_depth_maps_scaled_to_unit_range_and_flipped_with_the_image(tmp_path, tokenizer):
    images = captioned_folder(tmp_path / "images", 4)
    (tmp_path / "depth").mkdir()
    ramp = np.tile(np.linspace(3.0, 7.0, 40, dtype=np.float32), (36, 1))  # left to right
    for i, path in enumerate(sorted(images.glob("*.png"))):
        if i % 2:
            np.save(tmp_path / "depth" / path.with_suffix(".npy").name, ramp)
        else:  # a 16-bit PNG
            Image.fromarray(((ramp - 3) * 1000).astype(np.uint16)).save(tmp_path / "depth" / path.name)
    c = folder_config(images, condition="depth_from_file", condition_path=str(tmp_path / "depth"),
                      random_crop=False)
    rows = np.concatenate([b["condition"] for b in take(input_pipeline.make_train_iterator(
        c, tokenizer), 8)])
    assert rows.min() >= 0 and rows.max() <= 1
    np.testing.assert_array_equal(rows[..., 0], rows[..., 2])  # gray
    rising = rows[:, 16, -1, 0] > rows[:, 16, 0, 0]
    assert 0 < rising.mean() < 1  # flipped rows fall from left to right
    assert np.all(np.abs(rows[:, 16, 0, 0] - rows[:, 16, -1, 0]) > 0.7)


def test_a_missing_condition_file_skips_the_image(tmp_path, tokenizer):
    images = captioned_folder(tmp_path / "images", 4)
    (tmp_path / "cond").mkdir()
    for path in sorted(images.glob("*.png"))[1:]:
        (tmp_path / "cond" / path.name).write_bytes(path.read_bytes())
    c = folder_config(images, condition="image_folder", condition_path=str(tmp_path / "cond"))
    iterator = input_pipeline.make_train_iterator(c, tokenizer)
    take(iterator, 3)
    # 12 rows of 3 usable images: 4 epochs, the image without a file met 3 or 4 times
    assert set(iterator.stats["skipped"]) == {"no_condition"}
    assert iterator.stats["skipped"]["no_condition"] in (3, 4)


def test_the_condition_is_part_of_the_resume_fingerprint(tmp_path, tokenizer, caplog):
    images = captioned_folder(tmp_path / "images", 4)
    (tmp_path / "cond").mkdir()
    for path in images.glob("*.png"):
        (tmp_path / "cond" / path.name).write_bytes(path.read_bytes())
    c = folder_config(images, condition="image_folder", condition_path=str(tmp_path / "cond"))
    first = input_pipeline.make_train_iterator(c, tokenizer)
    take(first, 2)
    state = first.get_state()
    assert state["pipeline"]["condition"] == repr(conditions.ImageFolder(str(tmp_path / "cond")))
    again = input_pipeline.make_train_iterator(c, tokenizer)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["condition"], next(first)["condition"])
    plain = input_pipeline.make_train_iterator(folder_config(images), tokenizer)
    assert "condition" not in plain.get_state()["pipeline"]  # the states saved before it
    with caplog.at_level(logging.WARNING):
        plain.set_state(state)
    assert "changed settings (condition)" in caplog.text


def test_canny_edges_are_opencv_canny_of_the_image(tokenizer):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
    c = config(condition="canny", batch_size=4, caption_dropout=0.0)
    batch = next(input_pipeline.make_train_iterator(c, tokenizer))
    for image, condition in zip(batch["image"], batch["condition"]):
        rgb = np.round((image + 1) * 127.5).astype(np.uint8)
        expected = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200)
        np.testing.assert_array_equal(condition[..., 1] * 255, expected)
        assert set(np.unique(condition)) <= {0.0, 1.0} and condition.max() == 1.0


def test_condition_errors_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="data.condition='sketch' is not a condition"):
        conditions.from_config(config(condition="sketch"))
    with pytest.raises(ValueError, match="data.condition_path"):
        conditions.from_config(config(condition="image_folder", condition_path=str(tmp_path / "x")))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cv2" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'diffusion-jax\[controlnet\]'"):
        conditions.from_config(config(condition="canny"))

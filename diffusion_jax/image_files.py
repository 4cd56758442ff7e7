"""Pictures in and out of the pipeline: images given as PIL images, paths or arrays read into
the float arrays a request takes (init images, masks, ControlNet images as diffusers'
processors make them), and PNGs written with their recipe in the text chunks: the run's
settings as `diffusion-jax sample` records them and A1111's `parameters` ("PNG Info")."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from diffusion_jax import checkpoint

KARRAS_SUFFIX = "_karras"  # a sampler name with Karras sigmas: dpmpp_2m_karras


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def image_array(image: Any, height: int, width: int, name: str, channels: int) -> np.ndarray:
    """A PIL image, path or array -> float32 [H, W, channels] in [0, 1]."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if channels == 1 and array.ndim == 3:
        array = array[..., 0]
    if channels == 3 and array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[:2] != (height, width):
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]} (WxH) but the output is "
                         f"{width}x{height}; resize it or pass --height/--width to match")
    return array


def control_image(image: Any, height: int, width: int) -> np.ndarray:
    """A ControlNet's image as diffusers' control image processor makes it: RGB, resized to
    the output with Lanczos, float32 [H, W, 3] in [0, 1] (not normalised to [-1, 1])."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image_array(image, height, width, "control image", 3)


# What A1111 (and Forge, ComfyUI's A1111 importers, civitai) call our samplers.
A1111_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "pndm": "PLMS", "euler": "Euler",
                       "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                       "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM",
                       "flow_euler": "Euler", "flow_heun": "Heun"}


def a1111_sampler_name(sampler: str) -> str:
    """'dpmpp_2m_karras' -> 'DPM++ 2M Karras', 'euler_ancestral' -> 'Euler a'."""
    name = sampler.removesuffix(KARRAS_SUFFIX)
    return A1111_SAMPLER_NAMES[name] + (" Karras" if name != sampler else "")


def infotext(run: Mapping[str, Any], seed: int) -> str:
    """A1111's `parameters` text of image `seed` of a run recorded as `diffusion-jax sample`
    records it: what "PNG Info" tools read. A1111 drops `,` and `:` from the model name,
    which would end its field."""
    model = checkpoint.display_name(run["checkpoint"]).replace(",", "").replace(":", "")
    fields = {"Steps": run["steps"], "Sampler": a1111_sampler_name(run["sampler"]),
              "CFG scale": run["guidance"], "Seed": seed, "Size": f"{run['width']}x{run['height']}",
              "Model": model, "Denoising strength": run.get("strength"),
              "Eta": run["eta"] or None, "Version": f"diffusion_jax {run['diffusion_jax_version']}"}
    settings = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {run['negative_prompt']}" if run["negative_prompt"] else ""
    return f"{run['prompt']}{negative}\n{settings}"


def png_metadata(run: Mapping[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """Text chunks of a PNG holding the images of `seeds` from `run`: the run's settings with
    those seeds, and A1111's `parameters` of the first (as A1111 labels its grids)."""
    return {**run, "seeds": list(seeds), "parameters": infotext(run, seeds[0])}


def save_png(image: np.ndarray, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """An image [H, W, 3] (uint8, or float in [0, 1]) as a PNG; `metadata` goes into its text
    chunks (str values as they are, others as JSON) so the picture says how it was made.
    `path` may be local or a gs:// URI."""
    from PIL import Image, PngImagePlugin

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = to_uint8(np.clip(image, 0, 1))
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    with checkpoint.as_path(path).open("wb") as f:
        Image.fromarray(image).save(f, format="PNG", pnginfo=info)


def save_grid(images: np.ndarray, path: str | os.PathLike, metadata: Mapping[str, Any],
              columns: int | None = None) -> np.ndarray:
    """Images [N, H, W, 3] as one PNG grid of `columns` per row (default: up to 8), with
    `metadata` as `save_png` writes it; returns the grid [H', W', 3] as given to it."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    columns = columns or min(n, 8)
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    save_png(grid, path, metadata)
    return grid

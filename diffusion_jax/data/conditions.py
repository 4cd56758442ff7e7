"""ControlNet condition images, made per example by the data pipeline (`data.condition`).

    canny            edges of the training image itself (OpenCV's Canny on its grayscale,
                     after the resize, crop and flip), white on black
    image_folder     a file per image under `data.condition_path`, at the image's own
                     relative path (or its stem with another image extension)
    depth_from_file  a depth map per image under `data.condition_path`: `<stem>.npy` (float
                     [H, W]) or a 16- or 8-bit grayscale `<stem>.png`, scaled to [0, 1] per map

The condition is a float32 [size, size, 3] row in [0, 1] (diffusers' control images: RGB,
[0, 1]) under the batch key `condition`. A file-made one goes through the same resize, crop
and flip as its image, so the two stay aligned; an image without its file is skipped
("no_condition") like any unreadable example.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion_jax.data.sources import IMAGE_EXTENSIONS, Example, Skipped

CONDITIONS = ("canny", "image_folder", "depth_from_file")
CONDITION_KEY = "condition"


def _fit(image: np.ndarray, size: tuple[int, int], crop_at: float | None, flipped: bool
         ) -> np.ndarray:
    """A condition file's image fitted as its training image was: the same (height, width)
    (an aspect bucket's too), crop position and flip."""
    from diffusion_jax.data.input_pipeline import fit_image  # input_pipeline imports us

    image = fit_image(image, size, crop_at)[0]
    return image[:, ::-1] if flipped else image


def _unit_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 in [0, 1], contiguous (flips are views)."""
    return np.ascontiguousarray(image, np.float32) * np.float32(1 / 255)


def canny_edges(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> uint8 [H, W, 3] edges (255 on an edge), OpenCV's Canny of the
    grayscale with hysteresis thresholds `low`, `high` (diffusers' ControlNet training
    example: 100, 200)."""
    try:
        import cv2
    except ImportError:
        raise ImportError("data.condition='canny' needs OpenCV: pip install "
                          "'diffusion-jax[controlnet]' (opencv-python-headless)") from None
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


@dataclasses.dataclass(frozen=True)
class Canny:
    low: int = 100
    high: int = 200

    def __call__(self, example: Example, image: np.ndarray, crop_at: float | None,
                 flipped: bool) -> np.ndarray:
        return _unit_rgb(canny_edges(image, self.low, self.high))


def _find(folder: Path, name: str, extensions: tuple[str, ...]) -> Path | None:
    """`folder/name`, else `folder/<name's stem>.<ext>` for the first ext that exists."""
    exact = folder / name
    if exact.suffix.lower() in extensions and exact.is_file():
        return exact
    for ext in extensions:
        candidate = exact.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    path: str

    def __call__(self, example: Example, image: np.ndarray, crop_at: float | None,
                 flipped: bool) -> np.ndarray | Skipped:
        found = _find(Path(self.path), example.name, IMAGE_EXTENSIONS)
        if found is None:
            return Skipped("no_condition", example.name, f"no condition image in {self.path}")
        with Image.open(found) as f:
            rgb = np.asarray(f.convert("RGB"))
        return _unit_rgb(_fit(rgb, image.shape[:2], crop_at, flipped))


def read_depth(path: Path) -> np.ndarray:
    """A depth file -> float32 [H, W] in [0, 1] (min to max of the map; a flat map is 0)."""
    depth = (np.load(path) if path.suffix == ".npy"
             else np.asarray(Image.open(path))).astype(np.float32)
    if depth.ndim == 3:
        depth = depth[..., 0]
    low, span = depth.min(), np.ptp(depth)
    return (depth - low) / span if span > 0 else np.zeros_like(depth)


@dataclasses.dataclass(frozen=True)
class DepthFromFile:
    path: str

    def __call__(self, example: Example, image: np.ndarray, crop_at: float | None,
                 flipped: bool) -> np.ndarray | Skipped:
        found = _find(Path(self.path), example.name, (".npy", ".png"))
        if found is None:
            return Skipped("no_condition", example.name, f"no depth map in {self.path}")
        # 8-bit for the resize (PIL's bicubic takes uint8 RGB), as the depth images
        # diffusers' ControlNets are trained on are.
        gray = np.round(read_depth(found) * 255).astype(np.uint8)
        return _unit_rgb(_fit(np.repeat(gray[..., None], 3, axis=-1), image.shape[:2], crop_at,
                              flipped))


def from_config(data_config) -> Any:
    """The condition maker of `data.condition` ("" or absent: none)."""
    kind = data_config.get("condition", "")
    if not kind:
        return None
    if kind not in CONDITIONS:
        raise ValueError(f"data.condition={kind!r} is not a condition; use one of "
                         f"{list(CONDITIONS)} (or '' for none)")
    if kind == "canny":
        if importlib.util.find_spec("cv2") is None:
            raise ValueError("data.condition='canny' needs OpenCV: pip install "
                             "'diffusion-jax[controlnet]' (opencv-python-headless)")
        return Canny(data_config.get("canny_low", 100), data_config.get("canny_high", 200))
    path = data_config.get("condition_path", "")
    if not path or not Path(path).is_dir():
        raise ValueError(f"data.condition={kind!r} reads its files from data.condition_path="
                         f"{path!r}, which is not a folder: set --config.data.condition_path")
    return ImageFolder(path) if kind == "image_folder" else DepthFromFile(path)


def fingerprint(data_config) -> str:
    """What the data iterator state records of the condition (a resumed run warns when it
    changed)."""
    maker = from_config(data_config)
    return "" if maker is None else repr(maker)

"""Fashion-MNIST, the embedded default dataset, read from the idx files the package ships.

60,000 training and 10,000 held-out 28x28 grayscale images in 10 classes; captions come from
the class names ("a photo of a sneaker").
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "fashion_mnist"
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPLITS = {"train": "train", "test": "t10k"}


def caption(label: int) -> str:
    name = CLASS_NAMES[int(label)]
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path} is not an idx file (magic {found:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of `train` (60k) or `test` (10k)."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split {split!r} does not exist; use one of {sorted(SPLITS)}")
    prefix = ASSETS / SPLITS[split]
    images = _read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"), 0x803)
    labels = _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz"), 0x801)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels

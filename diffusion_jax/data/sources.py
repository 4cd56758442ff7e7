"""Random-access data sources: the bundled Fashion-MNIST, an image folder with captions, tfds,
and the precomputed latents `precompute.write_latents` writes.

A source is a sequence (`len`, `[i]`) of decoded examples, each either an `Example` (an RGB
uint8 image of any size, its caption and label, and the conversions it needed) or a `Skipped`
record naming the file and why it could not be used. Sources never raise on bad data: the
pipeline drops `Skipped`, counts it by reason and logs it, so one broken file never stops an
epoch. Construction, on the other hand, fails at once, with the fix in the message, for a wrong
path, an empty dataset or an unknown source.

Skip reasons: empty_file (0 bytes), not_an_image (PIL cannot identify it), truncated, corrupt
(undecodable data), too_large (PIL's decompression-bomb limit), unreadable (permissions, gone),
too_small (shorter side under data.min_image_size; counted by the pipeline); WebDataset shards
add missing_image (a sample without an image member, e.g. after a corrupt tar header) and
bad_tar (the shard's tar stream ends early: the samples before it are kept).
Conversions (counted, the example kept): grayscale (channel repeated to RGB), alpha (composited
on white), palette (expanded), 16bit (scaled to 8 bits), color_mode (CMYK, YCbCr, ... to RGB),
upscaled (smaller than the crop; counted by the pipeline), missing_caption (trains with "": the
image still teaches the unconditional prediction classifier-free guidance needs, and a folder
without any caption trains an unconditional model).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
from grain.sources import ArrayRecordDataSource
from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_jax.data import fashion_mnist

log = logging.getLogger(__name__)

SOURCES = ("fashion_mnist", "folder", "tfds", "latents")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclasses.dataclass(frozen=True)
class Example:
    image: np.ndarray            # uint8 [H, W, 3], any size
    caption: str
    label: int                   # -1 where the source has no labels
    name: str                    # file or record id, for log lines
    conversions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Skipped:
    reason: str                  # one of the skip reasons above
    name: str
    detail: str


def to_rgb(array: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """[H, W] or [H, W, 1|2|3|4] uint8/uint16 -> (uint8 [H, W, 3], the conversions made)."""
    conversions = []
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        conversions.append("16bit")
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] in (2, 4):  # gray+alpha / RGBA: composite on white, as a viewer shows it
        alpha = array[..., -1:].astype(np.float32) / 255.0
        array = np.round(array[..., :-1] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        conversions.append("alpha")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
        conversions.append("grayscale")
    return np.ascontiguousarray(array), tuple(conversions)


def pil_to_rgb(image: Image.Image) -> tuple[np.ndarray, tuple[str, ...]]:
    """A decoded PIL image of any mode -> (uint8 [H, W, 3], the conversions made)."""
    conversions: tuple[str, ...] = ()
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        conversions = ("palette",)
    elif image.mode in ("1", "F"):
        image = image.convert("L")
    elif image.mode not in ("L", "LA", "RGB", "RGBA") and not image.mode.startswith("I"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, premultiplied alpha
        conversions = ("color_mode",)
    array = np.asarray(image)
    if image.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer grayscale
        array = np.clip(array, 0, 65535).astype(np.uint16)
    rgb, more = to_rgb(array)
    return rgb, conversions + more


def decode_image_file(path: Path, name: str, caption: str, label: int = -1,
                      conversions: tuple[str, ...] = ()) -> Example | Skipped:
    """Reads and decodes one image file; bad files become `Skipped`, never an exception."""
    try:
        data = path.read_bytes()
    except OSError as err:  # permissions, gone, a folder named like an image
        return Skipped("unreadable", name, str(err))
    return decode_image_bytes(data, name, caption, label, conversions)


def decode_image_bytes(data: bytes, name: str, caption: str, label: int = -1,
                       conversions: tuple[str, ...] = ()) -> Example | Skipped:
    """Decodes one encoded image (a file's or a tar member's bytes); bad data becomes
    `Skipped`, never an exception."""
    if not data:
        return Skipped("empty_file", name, "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            rgb, made = pil_to_rgb(image)
    except UnidentifiedImageError as err:
        return Skipped("not_an_image", name, str(err))
    except Image.DecompressionBombError as err:
        return Skipped("too_large", name, str(err))
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err)
        return Skipped("truncated" if "truncat" in message.lower() else "corrupt", name, message)
    if min(rgb.shape[:2]) == 0:
        return Skipped("corrupt", name, f"image of size {rgb.shape[1]}x{rgb.shape[0]}")
    return Example(rgb, caption, label, name, conversions + made)


class FashionMNISTSource:
    """The bundled Fashion-MNIST split, resized once to `image_size` (28x28 grayscale, so the
    crop is the whole image); captions "a photo of a sneaker"."""

    read_threads = 0  # in memory: reader threads would only contend for the GIL

    def __init__(self, split: str, image_size: int):
        self.split = split
        self.image_size = image_size
        _, labels = fashion_mnist.load(split)  # raises for an unknown split
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> Example:
        images = resized_fashion_mnist(self.split, self.image_size)
        label = int(self._labels[index])
        image = np.repeat(images[index][..., None], 3, axis=-1)
        return Example(image, fashion_mnist.caption(label), label, f"fashion_mnist/{self.split}/{index}")


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PIL's bicubic (antialiased) 1-D resize, read off PIL itself."""
    identity = Image.fromarray(np.eye(in_size, dtype=np.float32), mode="F")
    return np.asarray(identity.resize((out_size, in_size), Image.BICUBIC), np.float64).T


@functools.lru_cache(maxsize=2)
def resized_fashion_mnist(split: str, image_size: int) -> np.ndarray:
    """uint8 [N, image_size, image_size]: every image through PIL's bicubic resize at once.
    PIL resizes rows then columns, rounding and clipping to 8 bits in between; two matrix
    products doing the same agree with it to 1 level (its fixed-point rounding), 20x faster."""
    images, _ = fashion_mnist.load(split)
    if image_size == images.shape[1]:
        return images
    weights = _resize_matrix(images.shape[1], image_size).astype(np.float32)
    rows = np.clip(np.round(images.astype(np.float32) @ weights.T), 0, 255)
    return np.clip(np.round(weights @ rows), 0, 255).astype(np.uint8)


def _read_caption_file(path: Path) -> dict[str, str]:
    """{relative file path: caption} from captions.jsonl or captions.csv; a malformed file is
    an error at start, naming the line."""
    captions = {}
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    captions[str(entry["file"])] = str(entry["caption"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{number}: expected a JSON object with \"file\" and "
                                     f"\"caption\" ({err!r}): {line.strip()[:80]!r}") from err
        else:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: needs a header row with columns file,caption "
                                 f"(found {reader.fieldnames})")
            for row in reader:
                captions[row["file"]] = row["caption"] or ""
    return {Path(name).as_posix(): caption for name, caption in captions.items()}


def held_out(relative_path: str, fraction: float) -> bool:
    """Whether a file belongs to the held-out split: a hash of its path, so the split is
    deterministic and stays put when files are added."""
    digest = hashlib.md5(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class FolderSource:
    """Images under a folder (subfolders too), captions from captions.jsonl / captions.csv
    (paths relative to the folder) or a `name.txt` beside `name.png`; the file entry wins.

    `held_out_split` selects the eval files (`eval_fraction` of them, by path hash); otherwise
    the rest. Labels are -1. `captioned` False: the captions come from elsewhere (data.caption),
    so images without one are not worth a warning.
    """

    read_threads = 4  # PIL decodes without the GIL: threads overlap file reads and decoding

    def __init__(self, path: str, *, held_out_split: bool, eval_fraction: float,
                 captioned: bool = True):
        root = Path(path).expanduser()
        if not path:
            raise ValueError("data.source='folder' needs data.path: set --config.data.path=DIR "
                             "to a folder of images")
        if not root.exists():
            raise FileNotFoundError(f"data.path={path!r} does not exist: set --config.data.path "
                                    "to a folder of images")
        if not root.is_dir():
            raise NotADirectoryError(f"data.path={path!r} is a file, not a folder of images")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".")
                                                  for part in p.relative_to(root).parts))
        images = [f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise ValueError(f"data.path={path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in it or its subfolders ({len(files)} other files)")
        self.root = root
        self.captions: dict[str, str] = {}
        for name in CAPTION_FILES:
            if (root / name).is_file():
                self.captions.update(_read_caption_file(root / name))
        file_set, image_set = set(files), set(images)
        self.caption_txt = {f for f in images if Path(f).with_suffix(".txt").as_posix() in file_set}
        unknown = [c for c in self.captions if c not in image_set]
        if unknown:
            log.warning("%s: %d captions name no image file here (e.g. %r)", root, len(unknown), unknown[0])
        uncaptioned = sum(1 for f in images if f not in self.captions and f not in self.caption_txt)
        if uncaptioned and captioned:
            log.warning("%s: %d of %d images have no caption; they train with the empty caption "
                        "(captions.jsonl, captions.csv or NAME.txt beside NAME.png)",
                        root, uncaptioned, len(images))
        self.files = [f for f in images if held_out(f, eval_fraction) == held_out_split]
        if not self.files:
            which = "held-out (eval)" if held_out_split else "training"
            raise ValueError(f"data.path={path!r}: the {which} split is empty ({len(images)} images, "
                             f"data.eval_fraction={eval_fraction}); add images or change eval_fraction")

    def __len__(self) -> int:
        return len(self.files)

    def _caption(self, name: str) -> str | None:
        if name in self.captions:
            return self.captions[name]
        if name in self.caption_txt:
            try:
                return (self.root / name).with_suffix(".txt").read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                log.warning("%s: caption file unreadable (%s)", name, err)
        return None

    def __getitem__(self, index: int) -> Example | Skipped:
        name = self.files[index]
        caption = self._caption(name)
        missing = () if caption is not None else ("missing_caption",)
        return decode_image_file(self.root / name, name, caption or "", conversions=missing)


def import_tfds():
    try:
        import tensorflow_datasets as tfds  # optional: only this source needs it
    except ImportError as err:
        raise ImportError("data.source='tfds' needs tensorflow-datasets, which is not installed: "
                          "pip install tensorflow-datasets (and array_record)") from err
    return tfds


class TfdsSource:
    """A prepared tensorflow-datasets dataset through `tfds.data_source` (array_record format).

    Captions: the text feature `caption_key` when set; else `caption_template` filled with the
    class name of `label_key` (`class_names`, or the dataset's own ClassLabel names); else "".
    """

    read_threads = 4

    def __init__(self, name: str, split: str, *, image_key: str, caption_key: str, label_key: str,
                 class_names: Sequence[str], caption_template: str):
        if not name:
            raise ValueError("data.source='tfds' needs data.path set to the dataset name, e.g. 'mnist'")
        tfds = import_tfds()
        try:
            self._source = tfds.data_source(name, split=split, download=False)
        except Exception as err:  # tfds raises several types for "not there"; all mean the same fix
            raise FileNotFoundError(
                f"tfds dataset {name!r} split {split!r} cannot be opened "
                f"({type(err).__name__}: {str(err)[:300]}). "
                f"Prepare it in array_record format first (`tfds build {name} "
                "--file_format=array_record`) and set TFDS_DATA_DIR to where it was written") from err
        features = self._source.dataset_info.features
        for key, role in ((image_key, "image_key"), (caption_key, "caption_key")):
            if key and key not in features:
                raise ValueError(f"data.{role}={key!r} is not a feature of tfds {name!r} "
                                 f"(features: {sorted(features.keys())})")
        self.name, self.image_key, self.caption_key = name, image_key, caption_key
        self.label_key = label_key if label_key in features else ""
        names = tuple(class_names) or tuple(getattr(features[self.label_key], "names", ())
                                            if self.label_key else ())
        self.class_names, self.caption_template = names, caption_template
        if not caption_key and not names:
            log.warning("tfds %r: no caption_key and no class names: every caption is \"\" "
                        "(an unconditional model)", name)
        if len(self._source) == 0:
            raise ValueError(f"tfds {name!r} split {split!r} is empty")

    def __len__(self) -> int:
        return len(self._source)

    def _caption(self, record: dict, label: int) -> str:
        if self.caption_key:
            text = record[self.caption_key]
            return text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if self.class_names and 0 <= label < len(self.class_names):
            return self.caption_template.format(self.class_names[label])
        return ""

    def __getitem__(self, index: int) -> Example | Skipped:
        name = f"{self.name}[{index}]"
        try:
            record = self._source[index]
            label = int(record[self.label_key]) if self.label_key else -1
            image, conversions = to_rgb(np.asarray(record[self.image_key]))
        except Exception as err:  # a record tfds cannot decode: skip it, keep the epoch going
            return Skipped("corrupt", name, f"{type(err).__name__}: {err}")
        return Example(image, self._caption(record, label), label, name, conversions)


def encode_record(arrays: dict[str, np.ndarray]) -> bytes:
    """One precomputed example as bytes: a length-prefixed JSON header of names, dtypes and
    shapes, then the raw arrays (no pickle, so reading a record runs no code)."""
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    header = json.dumps({name: [a.dtype.str, list(a.shape)] for name, a in arrays.items()}).encode()
    return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays.values())


def decode_record(record: bytes) -> dict[str, np.ndarray]:
    (size,) = struct.unpack_from("<I", record)
    offset, arrays = 4 + size, {}
    for name, (dtype, shape) in json.loads(record[4:offset]).items():
        array = np.frombuffer(record, np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        arrays[name] = array.reshape(shape)
        offset += array.nbytes
    if offset != len(record):
        raise ValueError(f"record of {len(record)} bytes, header describes {offset}")
    return arrays


LATENTS_META = "latents.json"
NULL_CONTEXT = "null_context.npy"
# The empty caption's conditioning, by cond key, which caption dropout swaps in.
NULL_COND = {"context": NULL_CONTEXT, "pooled": "null_pooled.npy"}


def cond_keys(meta: dict) -> list[str]:
    """The conditioning keys a latents.json says its records hold (before two text towers,
    only `has_context`)."""
    return list(meta.get("cond_keys") or (["context"] if meta.get("has_context") else []))


class LatentsSource:
    """Precomputed examples written by `precompute.write_latents` or `diffusion-jax precompute`:
    `latents.json` in the folder `path` lists the array_record files of each split (one
    `{split}.array_record`, or one `{split}-NNNNN.array_record` per WebDataset shard, or with
    aspect buckets `{split}-HxW[-NNNNN].array_record` per bucket [and shard]), each
    record {"latents", the ids keys ("input_ids", ...), "label"}, the text towers'
    conditioning ("context", "pooled") when it was stored too, and each image's
    "original_size" and "crop_top_left" when it was written for SDXL's micro-conditioning.
    Written with aspect buckets, latents.json's `buckets` lists each bucket's files
    ({split: {"HxW": [file, ...]}}); `bucket` "HxW" reads those alone."""

    read_threads = 0

    def __init__(self, path: str, split: str, bucket: str | None = None):
        root = Path(path).expanduser()
        meta_path = root / LATENTS_META
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"data.path={path!r} holds no precomputed latents ({LATENTS_META} is written "
                "last, when every shard is done); write them with `diffusion-jax precompute` "
                "or diffusion_jax.data.precompute.write_latents")
        self.meta = json.loads(meta_path.read_text())
        # latents.json of single-file folders (before sharded writing) lists no files
        files = self.meta.get("files") or {s: [f"{s}.array_record"] for s in self.meta["splits"]}
        if split not in files:
            raise ValueError(f"{meta_path} has no split {split!r}, only {sorted(files)}: set "
                             "data.split and data.eval_split to those it was written with")
        if bucket is not None:  # one aspect bucket's files (data/buckets.py)
            files = {split: self.meta["buckets"][split][bucket]}
        paths = [root / name for name in files[split]]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.path={path!r}: {len(missing)} of the {split!r} files "
                                    f"{LATENTS_META} lists are missing (e.g. {missing[0]})")
        self.split = split
        self.null_cond = {key: np.load(root / NULL_COND[key]) for key in cond_keys(self.meta)}
        self._records = ArrayRecordDataSource([str(p) for p in paths])
        if len(self._records) == 0:
            raise ValueError(f"data.path={path!r}: the {split!r} split holds no examples")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray] | Skipped:
        name = f"latents/{self.split}[{index}]"
        try:
            return decode_record(self._records[index])
        except (ValueError, KeyError, TypeError, struct.error) as err:
            return Skipped("corrupt", name, str(err))

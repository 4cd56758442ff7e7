"""CLIP score: how well images match their captions, in a CLIP model the user has.

    folder = clip_score.check_clip_folder("clip-vit-large-patch14")   # cheap: no weights read
    scorer = clip_score.load_clip(folder)
    result = clip_score.clip_score(batches_of_image_caption_pairs, scorer)
    print(result.score, result.count)

The model is a transformers `CLIPModel` folder (config.json, model.safetensors or a
pytorch_model.bin, the tokenizer files, preprocessor_config.json) run in JAX (`models/clip.py`).
The score is torchmetrics' `CLIPScore`: 100 * cos(image features, text features) per (image,
caption) pair, averaged, then clamped at 0. (torchmetrics' docstring writes the clamp per pair,
max(100 * cos, 0); its code, `torch.max(self.score / self.n_samples, 0)`, clamps the mean, and
that is what its users have been reporting. The two differ only when some pair's cosine is
negative, which a trained CLIP almost never gives; `pair_scores` has the unclamped values.)

Images are preprocessed as the folder's preprocessor_config.json tells transformers'
`CLIPImageProcessor` to (`ImageProcessing`): converted to RGB, the shortest side resized with
PIL (bicubic for CLIP) on the uint8 image, centre crop, rescale by 1/255, normalise by the
image mean and std. Captions are tokenized by the folder's tokenizer, padded to its
model_max_length; a longer caption keeps its first tokens and its EOS (transformers'
truncation; torchmetrics instead cuts the ids at 77 and so drops EOS, with a warning).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.models import clip

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# transformers' CLIPImageProcessor defaults, for keys a preprocessor_config.json leaves out.
_PROCESSOR_DEFAULTS = dict(do_resize=True, size={"shortest_edge": 224}, resample=3,
                           do_center_crop=True, crop_size={"height": 224, "width": 224},
                           do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                           image_mean=[0.48145466, 0.4578275, 0.40821073],
                           image_std=[0.26862954, 0.26130258, 0.27577711])

Pair = tuple[np.ndarray, str]  # (uint8 image [H, W, 3] of any size, its caption)


# ----------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """transformers' `CLIPImageProcessor` (its PIL backend) as a folder's
    preprocessor_config.json sets it up. None turns a step off."""

    shortest_edge: int | None  # resize so that the shorter side has this length
    resample: int  # PIL's filter code: 3 is bicubic
    crop: tuple[int, int] | None  # centre crop (height, width)
    rescale_factor: float | None
    mean: tuple[float, ...] | None  # normalisation
    std: tuple[float, ...] | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG) -> "ImageProcessing":
        d = {**_PROCESSOR_DEFAULTS, **d}
        size, crop = d["size"], d["crop_size"]
        # transformers 4's files write both as ints: size the shortest edge, crop a square.
        if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
            size = size["shortest_edge"]
        if isinstance(crop, Mapping) and set(crop) == {"height", "width"}:
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        if d["do_resize"] and not isinstance(size, int):
            raise ValueError(f"{source}: size={size!r} is not supported; CLIP's image processor "
                             "resizes the shortest edge: an int or {\"shortest_edge\": N}")
        if d["do_center_crop"] and not (isinstance(crop, tuple) and len(crop) == 2):
            raise ValueError(f"{source}: crop_size={d['crop_size']!r} is not supported; "
                             "expected an int or {\"height\": H, \"width\": W}")
        normalize = d["do_normalize"]
        return cls(shortest_edge=size if d["do_resize"] else None, resample=int(d["resample"]),
                   crop=tuple(map(int, crop)) if d["do_center_crop"] else None,
                   rescale_factor=float(d["rescale_factor"]) if d["do_rescale"] else None,
                   mean=tuple(map(float, d["image_mean"])) if normalize else None,
                   std=tuple(map(float, d["image_std"])) if normalize else None)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, rounded as transformers rounds it."""
        if self.shortest_edge is None:
            return height, width
        short, long = sorted((height, width))
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W], [H, W, 1|2|3|4] -> float32 [crop_h, crop_w, 3]."""
        from PIL import Image

        from diffusion_jax.data.sources import to_rgb

        pixels, _ = to_rgb(np.asarray(image))
        height, width = self.resized_size(*pixels.shape[:2])
        if (height, width) != pixels.shape[:2]:
            pixels = np.asarray(Image.fromarray(pixels).resize((width, height), self.resample))
        if self.crop:
            pixels = center_crop(pixels, *self.crop)
        # As transformers: the product in float64, rounded once to float32.
        pixels = (pixels * np.float64(self.rescale_factor or 1.0)).astype(np.float32)
        if self.mean is not None:
            pixels = (pixels - np.float32(self.mean)) / np.float32(self.std)
        return pixels


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop` of [H, W, C]: the top-left corner rounded down; an image
    smaller than the crop is zero-padded around it first (before rescale and normalise)."""
    pad_h, pad_w = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if pad_h or pad_w:
        top, left = -(-pad_h // 2), -(-pad_w // 2)
        image = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


# ----------------------------------------------------------------------------- the model folder


@dataclasses.dataclass(frozen=True)
class CLIPFolder:
    """A checked `CLIPModel` folder: everything but the weights read."""

    path: Path
    config: clip.CLIPConfig
    processing: ImageProcessing
    tokenizer: Any  # tokenizer.CLIPTokenizer


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_clip_folder(path: str | os.PathLike) -> CLIPFolder:
    """The folder's config, image processing and tokenizer, or a one-line error for a missing
    folder, a folder that is not a CLIPModel's or one that lacks a file. Weights are only
    located here, not read."""
    from diffusion_jax.convert.diffusers import weights_files
    from diffusion_jax.tokenizer import CLIPTokenizer

    root = Path(path).expanduser()
    what = ("a transformers CLIPModel folder (config.json, model.safetensors or "
            "pytorch_model.bin, the tokenizer files, preprocessor_config.json)")
    if not root.is_dir():
        raise FileNotFoundError(f"CLIP folder {path} does not exist; expected {what}")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not {what}")
    try:
        config = clip.CLIPConfig.from_dict(_read_json(root / "config.json"))
    except ValueError as e:
        raise ValueError(f"{path} is not a CLIPModel folder ({e})") from None
    weights_files(root)  # FileNotFoundError naming what it looked for
    if not (root / PREPROCESSOR_CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds no {PREPROCESSOR_CONFIG}: it says how images are "
                                "resized, cropped and normalised for this model")
    processing = ImageProcessing.from_dict(_read_json(root / PREPROCESSOR_CONFIG),
                                           source=str(root / PREPROCESSOR_CONFIG))
    vision = config.vision
    if processing.crop != (vision.image_size, vision.image_size):
        crop = "does not crop" if processing.crop is None else "crops to {}x{}".format(
            *processing.crop)
        raise ValueError(f"{root / PREPROCESSOR_CONFIG} {crop}; the model takes "
                         f"{vision.image_size}x{vision.image_size} images")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no tokenizer files ({e})") from None
    if tokenizer.max_length > config.text.max_position_embeddings:
        raise ValueError(f"{path}: the tokenizer's model_max_length {tokenizer.max_length} "
                         f"exceeds the text model's {config.text.max_position_embeddings} "
                         "positions")
    return CLIPFolder(root, config, processing, tokenizer)


def load_params(folder: CLIPFolder) -> dict:
    """The folder's weights as the param tree of `clip.CLIPModel(folder.config)`."""
    from diffusion_jax.convert.diffusers import read_state_dict
    from diffusion_jax.convert.torch_params import state_dict_to_params

    template = jax.eval_shape(clip.init_params, folder.config, jax.random.key(0))
    return state_dict_to_params(read_state_dict(folder.path), template, ignore=clip.TORCH_IGNORE,
                                source=f"{folder.path} (CLIPModel weights)")


# ----------------------------------------------------------------------------- scoring


class CLIPScorer:
    """CLIP features of (image, caption) pairs: preprocessing on the host, both towers
    jit-compiled once for `batch_size` pairs (a shorter batch is padded) and sharded over the
    devices along the batch."""

    def __init__(self, folder: CLIPFolder, params: Any, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 devices: Sequence[jax.Device] | None = None):
        self.folder = folder
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("batch",))
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        replicated = NamedSharding(self.mesh, PartitionSpec())
        batch = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.params = jax.device_put(params, replicated)
        model = clip.CLIPModel(folder.config)
        self._features = jax.jit(lambda p, ids, pixels: model.apply({"params": p}, ids, pixels),
                                 in_shardings=(replicated, batch, batch),
                                 out_shardings=replicated)

    def features(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """(image features, text features), float32 [N, projection_dim] each: transformers'
        `get_image_features` / `get_text_features` (projected, not normalised)."""
        images, texts = [], []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            pixels = np.stack([self.folder.processing(image) for image, _ in chunk])
            ids = self.folder.tokenizer([caption for _, caption in chunk])
            pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), np.float32)])
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
            text, image = self._features(self.params, ids, pixels)
            images.append(np.asarray(image)[:len(chunk)])
            texts.append(np.asarray(text)[:len(chunk)])
        width = self.folder.config.projection_dim
        if not images:
            return np.zeros((0, width), np.float32), np.zeros((0, width), np.float32)
        return np.concatenate(images), np.concatenate(texts)

    def pair_scores(self, pairs: Sequence[Pair]) -> np.ndarray:
        """float64 [N]: 100 * cos(image features, text features) of each pair, unclamped."""
        return scores_of_features(*self.features(pairs))


def scores_of_features(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """float64 [N]: 100 * cos of each (image features, text features) row pair."""
    images, texts = images.astype(np.float64), texts.astype(np.float64)
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
    return 100.0 * np.sum(images * texts, axis=-1)


def load_clip(folder: CLIPFolder | str | os.PathLike, *, batch_size: int = DEFAULT_BATCH_SIZE,
              devices: Sequence[jax.Device] | None = None) -> CLIPScorer:
    """The scorer of a CLIPModel folder (checked first when given as a path)."""
    if not isinstance(folder, CLIPFolder):
        folder = check_clip_folder(folder)
    return CLIPScorer(folder, load_params(folder), batch_size=batch_size, devices=devices)


@dataclasses.dataclass(frozen=True)
class CLIPScore:
    score: float  # torchmetrics' CLIPScore: max(mean of the pair scores, 0)
    count: int  # pairs scored
    mean: float  # the mean pair score, unclamped
    negative: int  # pairs whose cosine is negative


def clip_score(batches: Iterable[Sequence[Pair]], scorer: CLIPScorer) -> CLIPScore:
    """torchmetrics' CLIPScore of every (image, caption) pair in `batches`, streamed."""
    return _score_of((scorer.pair_scores(pairs) for pairs in batches))


def generated_clip_score(batches: Iterable[Sequence[Pair]], scorer: CLIPScorer,
                         num_pairs: int, batch_size: int) -> CLIPScore:
    """`clip_score` of `generated_pairs`' batches: this process's share scored here, the
    features of every process gathered in prompt order, so the score is a one-process run's."""
    from diffusion_jax import parallel

    local = [np.concatenate(scorer.features(pairs), axis=-1) for pairs in batches]
    width = scorer.folder.config.projection_dim
    every = parallel.gather_batches(local, -(-num_pairs // batch_size), (2 * width,), np.float32)
    return _score_of(scores_of_features(f[:, :width], f[:, width:]) for f in every)


def _score_of(score_batches: Iterable[np.ndarray]) -> CLIPScore:
    total, count, negative = 0.0, 0, 0
    for scores in score_batches:
        total += float(scores.sum())
        count += len(scores)
        negative += int((scores < 0).sum())
    if not count:
        raise ValueError("CLIP score of no images")
    mean = total / count
    return CLIPScore(score=max(mean, 0.0), count=count, mean=mean, negative=negative)


# ----------------------------------------------------------------------------- sources of pairs


class _DropMessages(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)


def check_image_folder(path: str | os.PathLike):
    """The images under `path` with their captions (captions.jsonl, captions.csv or NAME.txt
    beside NAME.png: the training folder source's formats) as a `data.sources.FolderSource`;
    a one-line error for a missing folder, no images or images without a caption."""
    from diffusion_jax.data import sources

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist")
    # The source warns that uncaptioned images "train with the empty caption"; here they are
    # the error below.
    quiet = _DropMessages("have no caption")
    sources.log.addFilter(quiet)
    try:
        source = sources.FolderSource(str(root), held_out_split=False, eval_fraction=0.0)
    finally:
        sources.log.removeFilter(quiet)
    uncaptioned = [f for f in source.files if f not in source.captions
                   and f not in source.caption_txt]
    if uncaptioned:
        raise ValueError(f"{path}: {len(uncaptioned)} of {len(source.files)} images have no "
                         f"caption (e.g. {uncaptioned[0]}); CLIP score needs one per image in "
                         "captions.jsonl ({\"file\": ..., \"caption\": ...}), captions.csv "
                         "(file,caption) or NAME.txt beside NAME.png")
    return source


def folder_batches(source, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[list[Pair]]:
    """Lists of (image, caption) pairs from a checked folder; files that cannot be decoded
    are skipped with a warning naming them and why (they do not count)."""
    from diffusion_jax.data.sources import Skipped

    batch: list[Pair] = []
    for index in range(len(source)):
        example = source[index]
        if isinstance(example, Skipped):
            log.warning("%s: skipped, %s (%s)", example.name, example.reason, example.detail)
            continue
        batch.append((example.image, example.caption))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def generated_pairs(checkpoint: str | os.PathLike, prompts: Sequence[str], *,
                    batch_size: int = 8, seed: int = 0, **sampling) -> Iterator[list[Pair]]:
    """One txt2img image per prompt, image i from prompts[i] with seed `seed + i` (as `fid
    --checkpoint` generates), paired with its prompt; with several processes, this one's
    share of the batches (as `fid.generated_batches`)."""
    from diffusion_jax import parallel
    from diffusion_jax.eval import fid

    batches = fid.generated_batches(checkpoint, prompts, len(prompts), batch_size=batch_size,
                                    seed=seed, **sampling)
    # This process's share: the batches parallel.my_batches names, in that order.
    for k, images in zip(parallel.my_batches(-(-len(prompts) // batch_size)), batches):
        yield list(zip(images, prompts[k * batch_size:k * batch_size + len(images)]))

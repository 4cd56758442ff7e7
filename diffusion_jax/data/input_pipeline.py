"""The grain input pipeline: source -> shard -> shuffle -> repeat -> prepare -> batch.

Per example (`prepare`): resize the shorter side to `image_size` (PIL bicubic, antialiased),
crop (center, or random), random horizontal flip, normalize to [-1, 1], caption dropout (the
caption becomes "" so the model also learns the unconditional prediction classifier-free
guidance needs), tokenize. All randomness comes from grain's per-element generator, seeded by
(seed, process, position in the repeated stream), so an example is augmented the same way
however the pipeline is run, and each epoch has its own shuffle order.

Bad examples travel through grain as `Skipped` records (never filtered inside the map) so the
stream has the same length and order with any number of worker processes; `TrainIterator`
drops them, counts them by reason, logs them and fills every batch to `batch_size`.

Resume: `TrainIterator.get_state()` is grain's iterator state plus the counters, a JSON-able
dict; `set_state` on a freshly made iterator yields exactly the batches the original would
have yielded next.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any, Callable

import grain
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from diffusion_jax.data import conditions, sources
from diffusion_jax.data.sources import Example, Skipped

log = logging.getLogger(__name__)

# A pipeline state only applies to a pipeline of the same shape: these must match to resume.
_STRUCTURAL_KEYS = ("batch_size", "process_index", "process_count", "num_workers", "buckets")
# Log every skipped file up to this many per reason, then one line per thousand.
_LOG_FIRST_SKIPS = 10


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config, set for the bundled Fashion-MNIST."""
    c = ml_collections.ConfigDict()
    c.source = "fashion_mnist"   # fashion_mnist (bundled) | folder | tfds | latents (precompute.py)
    c.path = ""                  # folder: image dir; tfds: dataset name; latents: precomputed dir
    c.split = "train"            # training split (folder: every image not held out)
    c.eval_split = "test"        # held-out split for eval loss (folder: the eval_fraction held out)
    c.eval_fraction = 0.05       # folder, webdataset precompute: fraction held out, by path/key hash
    c.image_key = "image"        # tfds: image feature
    c.caption_key = ""           # tfds: text feature for captions ("" = from labels)
    c.label_key = "label"        # tfds: label feature (absent -> label -1)
    c.class_names = ()           # tfds: label -> class name (empty: the dataset's ClassLabel names)
    c.caption_template = "a photo of {}"  # tfds: caption from a class name
    c.image_size = 32            # square side of the training images, pixels
    c.random_crop = False        # random crop of the longer side after resizing; else center crop
    c.min_image_size = 0         # skip images whose shorter side is below this ("too_small"); 0: keep all
    c.random_flip = True         # random horizontal flip
    c.aesthetic_score = 6.0      # SDXL refiner: the aesthetic score its time_ids carry for every image
    c.caption_dropout = 0.1      # fraction of captions replaced by "" (classifier-free guidance)
    c.caption = ""               # every image's caption, e.g. DreamBooth's "a photo of sks dog" ("": the source's)
    c.condition = ""             # ControlNet condition image: canny | image_folder | depth_from_file ("": none)
    c.condition_path = ""        # image_folder, depth_from_file: the folder of condition files
    c.canny_low = 100            # canny: OpenCV's hysteresis thresholds
    c.canny_high = 200           # (pixels between the two are edges only next to stronger ones)
    c.batch_size = 64            # GLOBAL batch; each process yields batch_size // process_count
    c.seed = 0                   # shuffle and augmentation seed
    c.num_workers = 0            # grain worker processes (0: in-process)
    c.buckets = ml_collections.ConfigDict()  # aspect-ratio buckets (data/buckets.py); off by default
    c.buckets.pixels = 0         # pixel budget of every bucket, e.g. 1024 * 1024 (0 and no sizes: off)
    c.buckets.step = 64          # bucket sides are multiples of this (VAE factor x U-Net downsampling)
    c.buckets.max_aspect = 2.0   # longest side / shortest side of the widest bucket
    c.buckets.sizes = ()         # explicit ((height, width), ...) instead of pixels/step/max_aspect
    return c


class OneCaption:
    """A source whose every example has `caption`."""

    def __init__(self, source, caption: str):
        self.source, self.caption = source, caption
        self.read_threads = getattr(source, "read_threads", 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        example = self.source[index]
        if isinstance(example, Skipped):
            return example
        conversions = tuple(c for c in example.conversions if c != "missing_caption")
        return dataclasses.replace(example, caption=self.caption, conversions=conversions)


def make_source(data_config, split: str, *, held_out: bool = False):
    """The source of `split` (every caption `data.caption` where it is set); `held_out`
    picks a folder's eval files."""
    source = _source(data_config, split, held_out)
    if data_config.get("caption"):
        if data_config.source == "latents":
            raise ValueError("data.caption sets the captions of images: precomputed latents "
                             "hold their ids already; precompute with it or train on the images")
        return OneCaption(source, data_config.caption)
    return source


def _source(data_config, split: str, held_out: bool):
    kind = data_config.source
    if kind == "fashion_mnist":
        return sources.FashionMNISTSource(split, data_config.image_size)
    if kind == "folder":
        return sources.FolderSource(data_config.path, held_out_split=held_out,
                                    eval_fraction=data_config.eval_fraction,
                                    captioned=not data_config.get("caption"))
    if kind == "tfds":
        return sources.TfdsSource(
            data_config.path, split, image_key=data_config.image_key,
            caption_key=data_config.caption_key, label_key=data_config.label_key,
            class_names=tuple(data_config.class_names), caption_template=data_config.caption_template)
    if kind == "latents":
        return sources.LatentsSource(data_config.path, split)
    raise ValueError(f"data.source={kind!r} is not a data source; use one of {list(sources.SOURCES)}")


def text_tokenizers(text) -> dict[str, Any]:
    """{ids key: tokenizer} of `text`: a `system.TextInputs` (one tokenizer per text tower),
    or one tokenizer, whose ids are `input_ids`."""
    tokenizers = getattr(text, "tokenizers", None)  # duck-typed: data/ imports no models
    return dict(tokenizers) if tokenizers is not None else {"input_ids": text}


class CaptionIds:
    """caption -> {ids key: int32 [max_length] ids}, one entry per text tower, memoized:
    datasets repeat their captions (Fashion-MNIST has ten, plus "") and the BPE is the
    costliest step of an example. `text`: a `system.TextInputs` or one tokenizer."""

    _MAX_ENTRIES = 100_000

    def __init__(self, text):
        self.tokenizers = text_tokenizers(text)
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, caption: str) -> dict[str, np.ndarray]:
        ids = self._cache.get(caption)
        if ids is None:
            if len(self._cache) >= self._MAX_ENTRIES:
                self._cache.clear()
            ids = self._cache[caption] = {key: tokenizer([caption])[0]
                                          for key, tokenizer in self.tokenizers.items()}
        return ids

    def __getstate__(self):  # workers get the tokenizers, not the cache
        return {"tokenizers": self.tokenizers, "_cache": {}}


def fit_image(image: np.ndarray, size: int | tuple[int, int], crop_at: float | None
              ) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """Resize to cover `size` (a square's side, or an aspect bucket's (height, width);
    bicubic, antialiased) and crop the overhanging side, at `crop_at` in [0, 1) of the slack
    (None: centered). Returns (uint8 [height, width, 3], upscaled, the crop's (top, left) in
    the resized image)."""
    out_height, out_width = (size, size) if isinstance(size, int) else size
    height, width = image.shape[:2]
    scale = max(out_height / height, out_width / width)
    upscaled = scale > 1
    if scale != 1:
        new_width = max(out_width, round(width * scale))
        new_height = max(out_height, round(height * scale))
        image = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC))
        height, width = new_height, new_width
    slack_y, slack_x = height - out_height, width - out_width
    if crop_at is None:
        top, left = slack_y // 2, slack_x // 2
    else:
        top, left = int(crop_at * (slack_y + 1)), int(crop_at * (slack_x + 1))
    return image[top:top + out_height, left:left + out_width], upscaled, (top, left)


@dataclasses.dataclass(frozen=True)
class Prepared:
    arrays: dict[str, np.ndarray]   # one batch row
    name: str
    conversions: tuple[str, ...]


# SDXL's micro-conditioning: (original size (h, w), crop (top, left)) -> a row's time_ids,
# e.g. functools.partial(system.time_ids, 6, target_size=(1024, 1024)). data/ takes it as a
# callable: it imports no models.
TimeIds = Callable[[tuple[int, int], tuple[int, int]], np.ndarray]
MICRO_KEYS = ("original_size", "crop_top_left")  # int32 [2] per row, beside "time_ids"


def micro_conditioning(time_ids: TimeIds, original_size, crop_top_left) -> dict[str, np.ndarray]:
    """A row's size and crop numbers (kept so precompute can store them) and its time_ids."""
    return {"original_size": np.asarray(original_size, np.int32),
            "crop_top_left": np.asarray(crop_top_left, np.int32),
            "time_ids": np.asarray(time_ids(tuple(original_size), tuple(crop_top_left)),
                                   np.float32)}


@dataclasses.dataclass
class PrepareImage:
    """Example -> Prepared row {"image", the ids keys ("input_ids", ...), "label"} (+ with
    `time_ids`, SDXL's "original_size" (h, w) before the resize, "crop_top_left" (top,
    left) in the resized image, as SDXL's training scripts record them, and "time_ids");
    rng None: deterministic (eval). Images whose shorter side is below `min_image_size`
    become Skipped("too_small")."""

    image_size: int | tuple[int, int]  # a square's side, or an aspect bucket's (height, width)
    random_crop: bool
    random_flip: bool
    caption_dropout: float
    caption_ids: CaptionIds
    min_image_size: int = 0
    time_ids: TimeIds | None = None
    # A ControlNet's "condition" row from (example, the fitted image, crop, flipped), or a
    # Skipped (see conditions.py).
    condition: Callable | None = None

    def __call__(self, example: Example | Skipped, rng: np.random.Generator | None = None):
        if isinstance(example, Skipped):
            return example
        height, width = example.image.shape[:2]
        if min(height, width) < self.min_image_size:
            return Skipped("too_small", example.name, f"{width}x{height}, data.min_image_size="
                                                      f"{self.min_image_size}")
        if rng is None:  # eval: center crop, no flip, the real caption
            crop_u, flip_u, drop_u = None, 1.0, 1.0
        else:  # always three draws, so switching one augmentation never shifts another's
            crop_u, flip_u, drop_u = rng.random(3)
        crop_at = crop_u if self.random_crop else None
        image, upscaled, crop = fit_image(example.image, self.image_size, crop_at)
        flipped = self.random_flip and flip_u < 0.5
        if flipped:
            image = image[:, ::-1]
        caption = "" if drop_u < self.caption_dropout else example.caption
        arrays = {"image": image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0),
                  **self.caption_ids(caption),
                  "label": np.int32(example.label)}
        if self.time_ids is not None:
            arrays.update(micro_conditioning(self.time_ids, (height, width), crop))
        if self.condition is not None:
            condition = self.condition(example, image, crop_at, flipped)
            if isinstance(condition, Skipped):
                return condition
            arrays[conditions.CONDITION_KEY] = condition
        return Prepared(arrays, example.name, example.conversions + (("upscaled",) if upscaled else ()))


@dataclasses.dataclass
class PrepareLatents:
    """Precomputed record -> Prepared row {"latents", the ids keys, "label"[, "context",
    "pooled"][, "time_ids" from the record's size and crop]}. Caption dropout swaps in the
    empty caption's ids and its conditioning together (the loss uses the batch's
    conditioning in place of the ids); no flip, no crop: the augmentation was fixed when the
    latents were written."""

    caption_dropout: float
    empty_ids: dict[str, np.ndarray]  # ids key -> the empty caption's ids
    null_cond: dict[str, np.ndarray]  # cond key -> the empty caption's context / pooled
    time_ids: TimeIds | None = None

    def __call__(self, record: dict[str, np.ndarray] | Skipped, rng: np.random.Generator | None = None):
        if isinstance(record, Skipped):
            return record
        arrays = dict(record)
        arrays["label"] = np.int32(arrays["label"])
        if rng is not None and rng.random() < self.caption_dropout:
            arrays.update(self.empty_ids)
            arrays.update(self.null_cond)
        if self.time_ids is not None:
            arrays.update(micro_conditioning(self.time_ids, arrays["original_size"],
                                             arrays["crop_top_left"]))
        return Prepared(arrays, "latents", ())


def _check_latents_ids(data_config, source: sources.LatentsSource, tokenizers: dict) -> None:
    """The records' ids must be those the tokenizers make: one length per ids key
    (latents.json `max_lengths`; `max_length` where it was written for `input_ids` alone)."""
    written = source.meta.get("max_lengths") or {"input_ids": source.meta["max_length"]}
    for key, tokenizer in tokenizers.items():
        if key not in written:
            raise ValueError(f"{data_config.path} holds no {key} (only {sorted(written)}): "
                             "rewrite the latents with every text tower's tokenizer")
        if written[key] != tokenizer.max_length:
            raise ValueError(f"{data_config.path} holds {key} of length {written[key]}, "
                             f"the tokenizer makes {tokenizer.max_length}: rewrite the latents "
                             "with it")


def make_prepare(data_config, text, source, time_ids: TimeIds | None = None):
    """`text`: a `system.TextInputs` or one tokenizer (its ids are `input_ids`); `time_ids`:
    rows get SDXL's micro-conditioning (see PrepareImage), None: they do not."""
    caption_ids = CaptionIds(text)
    condition = conditions.from_config(data_config)
    if isinstance(source, sources.LatentsSource):
        if condition is not None:
            raise ValueError(f"data.condition={data_config.condition!r} is made from images: "
                             "precomputed latents have none; train on the images")
        _check_latents_ids(data_config, source, caption_ids.tokenizers)
        if time_ids is not None and not source.meta.get("micro_conditioning"):
            raise ValueError(f"{data_config.path} holds no image sizes and crops (written for a "
                             "U-Net without SDXL's micro-conditioning): rewrite the latents "
                             "with `diffusion-jax precompute` and this config")
        return PrepareLatents(data_config.caption_dropout, caption_ids(""), source.null_cond,
                              time_ids)
    return PrepareImage(data_config.image_size, data_config.random_crop, data_config.random_flip,
                        data_config.caption_dropout, caption_ids, data_config.min_image_size,
                        time_ids, condition)


class ExampleCounter:
    """Skips and conversions seen, by reason; logs skipped files (rate-limited) and the first
    file of each kind of conversion."""

    def __init__(self):
        self.examples = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.converted: collections.Counter[str] = collections.Counter()

    def skip(self, skipped: Skipped) -> None:
        self.skipped[skipped.reason] += 1
        count = self.skipped[skipped.reason]
        if count <= _LOG_FIRST_SKIPS or count % 1000 == 0:
            log.warning("skipped %s: %s (%s; %d skipped for this reason so far)",
                        skipped.name, skipped.reason, skipped.detail, count)

    def keep(self, prepared: Prepared) -> None:
        self.examples += 1
        for reason in prepared.conversions:
            self.converted[reason] += 1
            if self.converted[reason] == 1:
                log.info("converted %s: %s (the first such; counted in the data stats)",
                         prepared.name, reason)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "skipped": dict(sorted(self.skipped.items())),
                "converted": dict(sorted(self.converted.items()))}

    def load(self, state: dict[str, Any]) -> None:
        self.examples = int(state["examples"])
        self.skipped = collections.Counter(state["skipped"])
        self.converted = collections.Counter(state["converted"])


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class TrainIterator:
    """Infinite iterator of full batches (dicts of numpy arrays) for this process.

    `stats` counts the examples yielded and the ones skipped or converted, by reason (a skipped
    example is not retried: counts grow each epoch it comes round again). `len_dataset` is the
    number of examples in this process's shard.
    """

    def __init__(self, dataset: grain.IterDataset, *, batch_size: int, len_dataset: int,
                 fingerprint: dict[str, Any]):
        self.batch_size = batch_size
        self.len_dataset = len_dataset
        self._fingerprint = fingerprint
        self._elements = iter(dataset)
        self._counter = ExampleCounter()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, skipped_in_a_row = [], 0
        while len(rows) < self.batch_size:
            element = next(self._elements)
            if isinstance(element, Skipped):
                self._counter.skip(element)
                skipped_in_a_row += 1
                if skipped_in_a_row > self.len_dataset:  # a whole epoch without one usable example
                    raise RuntimeError(f"every example of the dataset was skipped: {self.stats}")
                continue
            skipped_in_a_row = 0
            self._counter.keep(element)
            rows.append(element.arrays)
        return stack_rows(rows)

    @property
    def stats(self) -> dict[str, Any]:
        """{"examples": yielded, "skipped": {reason: n}, "converted": {reason: n}}."""
        return self._counter.as_dict()

    def get_state(self) -> dict[str, Any]:
        return {"elements": self._elements.get_state(), "counts": self._counter.as_dict(),
                "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        check_resume_fingerprint(state["pipeline"], self._fingerprint)
        self._elements.set_state(state["elements"])
        self._counter.load(state["counts"])

    def close(self) -> None:
        """Stops grain's worker processes and reader threads."""
        self._elements.close()


def check_resume_fingerprint(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A saved iterator state fits this pipeline: a ValueError where its shape changed, a
    warning where only settings that change the data (not its shape) did."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    structural = [k for k in changed if k in _STRUCTURAL_KEYS]
    if structural:
        raise ValueError("the data iterator state was saved by a differently shaped pipeline: "
                         + ", ".join(f"{k} was {saved.get(k)!r}, now {current.get(k)!r}"
                                     for k in structural)
                         + "; restore those settings or start a new workdir")
    if changed:
        log.warning("resuming the data iterator with changed settings (%s): the data will "
                    "not be exactly what the original run would have seen", ", ".join(changed))


def _check_config(data_config, process_count: int) -> None:
    if data_config.source not in sources.SOURCES:
        raise ValueError(f"data.source={data_config.source!r} is not a data source; "
                         f"use one of {list(sources.SOURCES)}")
    if data_config.batch_size <= 0 or data_config.batch_size % process_count:
        raise ValueError(f"data.batch_size={data_config.batch_size} must be a positive multiple "
                         f"of the process count ({process_count})")
    if data_config.image_size <= 0:
        raise ValueError(f"data.image_size={data_config.image_size} must be positive")
    if data_config.min_image_size < 0:
        raise ValueError(f"data.min_image_size={data_config.min_image_size} must be >= 0 (0: no filter)")
    if not 0.0 <= data_config.caption_dropout <= 1.0:
        raise ValueError(f"data.caption_dropout={data_config.caption_dropout} must be in [0, 1]")
    if data_config.num_workers < 0:
        raise ValueError(f"data.num_workers={data_config.num_workers} must be >= 0")


@functools.lru_cache(maxsize=4)
def epoch_permutation(length: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(length)


class EpochShuffle(grain.MapDataset):
    """The parent in a new order each epoch of the repeated index stream (`.repeat()` after it
    passes indices past the first epoch through). numpy permutations, not grain's `shuffle`:
    grain's index_shuffle costs 0.3 ms per element at 200 examples and 5 ms at 10."""

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = seed

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, len(self._parent))
        permutation = epoch_permutation(len(self._parent), self._seed, epoch)
        return self._parent[int(permutation[position])]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"


def _seed(seed: int, process_index: int, purpose: int) -> int:
    """A 32-bit seed (what grain takes) per (config seed, process, purpose)."""
    return int(np.random.SeedSequence([seed, process_index, purpose]).generate_state(1)[0])


def _read_options(source) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=source.read_threads, prefetch_buffer_size=128)


def make_train_iterator(data_config, text, *, process_index: int = 0, process_count: int = 1,
                        time_ids: TimeIds | None = None) -> TrainIterator:
    """This process's infinite, shuffled, augmented batches of batch_size // process_count rows,
    with the ids of every tokenizer of `text` (a `system.TextInputs`, or one tokenizer) and,
    with `time_ids`, SDXL's micro-conditioning (see PrepareImage).

    Process i reads the disjoint shard `source[i::process_count]` and shuffles it with its own
    order per epoch; together the processes' batches make the global batch.
    """
    _check_config(data_config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    source = make_source(data_config, data_config.split)
    shard = grain.MapDataset.source(source)[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no examples: the "
                         f"dataset has only {len(source)}")
    prepare = make_prepare(data_config, text, source, time_ids)
    dataset = (EpochShuffle(shard, seed=_seed(data_config.seed, process_index, 0))
               .repeat(None)
               .random_map(prepare, seed=_seed(data_config.seed, process_index, 1))
               .to_iter_dataset(_read_options(source)))
    if data_config.num_workers:
        # grain 0.2.18 reads an absl flag when it starts workers, which fails outside absl.app
        # unless the flags count as parsed (google/grain#1355); only grain's flags use them here.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    fingerprint = {"source": data_config.source, "path": data_config.path, "split": data_config.split,
                   "len_dataset": len(shard), "image_size": data_config.image_size,
                   "random_crop": data_config.random_crop, "random_flip": data_config.random_flip,
                   "min_image_size": data_config.min_image_size,
                   "caption_dropout": data_config.caption_dropout, "seed": data_config.seed,
                   "batch_size": data_config.batch_size // process_count,
                   "process_index": process_index, "process_count": process_count,
                   "num_workers": data_config.num_workers}
    if data_config.get("caption"):  # absent otherwise, as the condition
        fingerprint["caption"] = data_config.caption
    if data_config.get("condition"):  # absent otherwise: states saved before it resume alike
        fingerprint["condition"] = conditions.fingerprint(data_config)
    return TrainIterator(dataset, batch_size=data_config.batch_size // process_count,
                         len_dataset=len(shard), fingerprint=fingerprint)


def iterate_split(data_config, text, split: str, *, held_out: bool,
                  time_ids: TimeIds | None = None):
    """(every prepared example of a split in order, deterministically: center crop, no flip,
    no caption dropout), with the counter that saw them."""
    source = make_source(data_config, split, held_out=held_out)
    return prepared_rows(source, make_prepare(data_config, text, source, time_ids))


def prepared_rows(source, prepare):
    """(every example of `source` through `prepare` in order, deterministically), with the
    counter that saw them."""
    dataset = grain.MapDataset.source(source).map(functools.partial(prepare, rng=None))
    counter = ExampleCounter()

    def examples():
        for element in dataset.to_iter_dataset(_read_options(source)):
            if isinstance(element, Skipped):
                counter.skip(element)
            else:
                counter.keep(element)
                yield element.arrays

    return examples(), counter


def make_eval_batches(data_config, text, *, num_examples: int, batch_size: int,
                      time_ids: TimeIds | None = None) -> list[dict[str, np.ndarray]]:
    """The first `num_examples` usable examples of the held-out split, deterministic, in full
    batches of `batch_size` (a last partial batch is dropped so every batch has one shape)."""
    _check_config(data_config, 1)
    rows = []
    examples, counter = iterate_split(data_config, text, data_config.eval_split, held_out=True,
                                      time_ids=time_ids)
    for row in examples:
        if len(rows) == num_examples:
            break
        rows.append(row)
    usable = len(rows) // batch_size * batch_size
    if usable == 0:
        raise ValueError(f"the eval split {data_config.eval_split!r} has {len(rows)} usable examples, "
                         f"fewer than one batch of {batch_size} ({counter.as_dict()})")
    if usable < num_examples:
        log.warning("eval: %d examples asked for, %d used (%s)", num_examples, usable, counter.as_dict())
    return [stack_rows(rows[i:i + batch_size]) for i in range(0, usable, batch_size)]

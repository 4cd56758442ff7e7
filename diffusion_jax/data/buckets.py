"""Aspect-ratio buckets, the NovelAI / SDXL scheme: a fixed list of (height, width) sizes near
one pixel budget; each image trains at the bucket nearest its aspect ratio (resized to cover
it and cropped, the crop recorded for SDXL's micro-conditioning); every batch comes from one
bucket, so a batch has one shape and the jitted train step compiles once per bucket.

Which bucket step s draws from is a function of (seed, s) alone, weighted by the buckets'
populations over the whole dataset: every process agrees on the shape of the global batch,
and a resumed run draws what the original would have. Within a bucket, this process's
examples come from the bucket's own shuffled, repeated stream (a new order each epoch), read
at a cursor; each position is augmented by grain's per-position generator. The iterator state
is (batches yielded, one cursor per bucket, the counters), so `set_state` on a fresh iterator
yields exactly the batches the original would have yielded next.

Buckets come from `data.buckets` (see input_pipeline.default_data_config): `sizes`, or every
height a multiple of `step` with the widest multiple-of-`step` width within `pixels` (and
the mirror of each), whose aspect is at most `max_aspect`. A bucket holding fewer images
than there are processes (each process reads its own share of every bucket) is dropped and
its images go to the next nearest. Precomputed latents (precompute.write_latents with data.buckets) hold one file per
bucket and train in the buckets they were written in. Eval batches and sample grids stay
square at data.image_size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from diffusion_jax.data import input_pipeline, sources
from diffusion_jax.data.sources import Skipped

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width)
# EXIF orientations that turn the image a quarter: decoding (exif_transpose) swaps its sides.
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def enabled(buckets_config) -> bool:
    return bool(buckets_config.pixels or buckets_config.sizes)


def sizes_near_budget(pixels: int, step: int, max_aspect: float) -> list[Size]:
    """For every height a multiple of `step`, the widest multiple-of-`step` width with
    height x width <= `pixels`, and the same with the sides swapped (so the list is its own
    mirror), kept when the aspect is at most `max_aspect`."""
    sizes = []
    for height in range(step, pixels // step + 1, step):
        width = pixels // height // step * step
        if width >= step and max(height, width) <= max_aspect * min(height, width):
            sizes += [(height, width), (width, height)]
    return sizes


def check_config(buckets_config, multiple: int = 1) -> None:
    """ValueErrors naming the `data.buckets` key and the fix; `multiple`: what every side
    must divide by (VAE downsampling x denoiser levels)."""
    b = buckets_config
    if b.sizes:
        for size in b.sizes:
            if (len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size)
                    or any(side % multiple for side in size)):
                raise ValueError(f"data.buckets.sizes has {tuple(size)!r}: each entry must be "
                                 f"(height, width), positive multiples of {multiple}")
        return
    if b.step <= 0 or b.step % multiple:
        raise ValueError(f"data.buckets.step={b.step} must be a positive multiple of {multiple} "
                         "(VAE downsampling x denoiser levels)")
    if b.max_aspect < 1:
        raise ValueError(f"data.buckets.max_aspect={b.max_aspect} must be >= 1 (longest side "
                         "over shortest)")
    if b.pixels < b.step * b.step:
        raise ValueError(f"data.buckets.pixels={b.pixels} is below one step x step square "
                         f"({b.step * b.step}): raise it, e.g. to 1024 * 1024 for SDXL")


def bucket_sizes(buckets_config) -> tuple[Size, ...]:
    """The buckets of `data.buckets`, from the tallest to the widest (ascending width /
    height)."""
    check_config(buckets_config)
    if buckets_config.sizes:
        sizes = {(int(h), int(w)) for h, w in buckets_config.sizes}
    else:
        sizes = set(sizes_near_budget(buckets_config.pixels, buckets_config.step,
                                      buckets_config.max_aspect))
    return tuple(sorted(sizes, key=lambda s: (s[1] / s[0], s[0] * s[1])))


def largest(buckets: Sequence[Size]) -> Size:
    """The bucket of the most pixels: the batch that needs the most memory."""
    return max(buckets, key=lambda s: (s[0] * s[1], max(s)))


def _log_aspects(sizes) -> np.ndarray:
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    return np.log(sizes[:, 1] / sizes[:, 0])


def nearest(image_sizes, buckets: Sequence[Size]) -> np.ndarray:
    """[N] index into `buckets` (ascending aspect) of the bucket nearest each (height, width)
    in log aspect ratio, so 2:1 and 1:2 are equally far from 1:1; a tie goes to the wider."""
    targets, aspects = _log_aspects(buckets), _log_aspects(image_sizes)
    right = np.clip(np.searchsorted(targets, aspects), 0, len(targets) - 1)
    left = np.clip(right - 1, 0, len(targets) - 1)
    closer_left = np.abs(aspects - targets[left]) < np.abs(aspects - targets[right])
    return np.where(closer_left, left, right)


def assign(image_sizes, buckets: Sequence[Size], min_count: int = 1) -> np.ndarray:
    """[N] bucket index of each image: its nearest bucket among those holding at least
    `min_count` images (the thinnest under it is dropped, one at a time, and its images move
    to their next nearest)."""
    alive = np.arange(len(buckets))
    while True:
        choice = alive[nearest(image_sizes, [buckets[i] for i in alive])]
        counts = np.bincount(choice, minlength=len(buckets))[alive]
        thin = (counts > 0) & (counts < min_count)
        if not thin.any() or len(alive) == 1:
            return choice
        alive = np.delete(alive, np.argmin(np.where(thin, counts, np.iinfo(np.int64).max)))


def _header_size(path) -> Size | None:
    """(height, width) of an image file as decoding will give it (EXIF rotation applied), from
    its header; None where it cannot be read (decoding then skips it with the reason)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
    except Exception:  # any unreadable file: the pipeline's decode names the reason
        return None
    return height, width


def image_sizes(source) -> np.ndarray:
    """int [N, 2] (height, width) of every example of `source`, read before training (file
    headers: no decoding). Unreadable files count as square; decoding skips them."""
    if isinstance(source, input_pipeline.OneCaption):
        return image_sizes(source.source)
    if isinstance(source, sources.FashionMNISTSource):
        return np.full((len(source), 2), source.image_size, np.int64)
    if isinstance(source, sources.FolderSource):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            sizes = list(pool.map(_header_size, [source.root / f for f in source.files]))
        return np.asarray([size or (1, 1) for size in sizes], np.int64).reshape(-1, 2)
    raise ValueError(f"data.buckets needs every image's size before training, which a "
                     f"{type(source).__name__} does not give: use data.source='folder' (or "
                     "precomputed latents written with buckets), or turn buckets off with "
                     "--config.data.buckets.pixels=0")


class _Subset:
    """`source` at `indices`: one bucket's share of this process's examples."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices
        self.read_threads = source.read_threads

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]


def _seed(seed: int, *parts: int) -> int:
    """A 32-bit seed (what grain takes) per (config seed, purpose, ...)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


def bucket_key(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclasses.dataclass(frozen=True)
class Bucket:
    size: Size
    population: int  # images in the whole dataset: the bucket's weight
    stream: grain.MapDataset  # this process's examples, shuffled per epoch, repeated, prepared
    shard_length: int  # this process's examples of it


class BucketIterator:
    """Infinite iterator of this process's full batches, each from one bucket (see the module
    docstring); the state and `stats` of input_pipeline.TrainIterator."""

    def __init__(self, buckets: Sequence[Bucket], *, batch_size: int, seed: int,
                 fingerprint: dict[str, Any], read_threads: int):
        self.buckets = tuple(buckets)
        self.batch_size = batch_size
        self.len_dataset = sum(b.shard_length for b in self.buckets)
        populations = np.asarray([b.population for b in self.buckets], np.float64)
        self._weights = populations / populations.sum()
        self._seed = seed
        self._fingerprint = fingerprint
        self._batches = 0
        self._cursors = [0] * len(self.buckets)
        self._counter = input_pipeline.ExampleCounter()
        self._pool = (concurrent.futures.ThreadPoolExecutor(read_threads)
                      if read_threads else None)

    def __iter__(self) -> BucketIterator:
        return self

    def bucket_of_batch(self, batch: int) -> int:
        """Index of the bucket batch number `batch` draws from: (seed, batch) alone."""
        rng = np.random.default_rng([self._seed, batch])
        return int(rng.choice(len(self._weights), p=self._weights))

    def _read(self, bucket: int, count: int) -> list:
        stream, start = self.buckets[bucket].stream, self._cursors[bucket]
        self._cursors[bucket] += count
        positions = range(start, start + count)
        if self._pool is None:
            return [stream[p] for p in positions]
        return list(self._pool.map(stream.__getitem__, positions))

    def __next__(self) -> dict[str, np.ndarray]:
        bucket = self.bucket_of_batch(self._batches)
        rows, skipped_in_a_row = [], 0
        while len(rows) < self.batch_size:
            for element in self._read(bucket, self.batch_size - len(rows)):
                if isinstance(element, Skipped):
                    self._counter.skip(element)
                    skipped_in_a_row += 1
                    if skipped_in_a_row > self.buckets[bucket].shard_length:
                        raise RuntimeError(f"every example of the bucket "
                                           f"{bucket_key(self.buckets[bucket].size)} was "
                                           f"skipped: {self.stats}")
                    continue
                skipped_in_a_row = 0
                self._counter.keep(element)
                rows.append(element.arrays)
        self._batches += 1
        return input_pipeline.stack_rows(rows)

    @property
    def stats(self) -> dict[str, Any]:
        return self._counter.as_dict()

    def get_state(self) -> dict[str, Any]:
        return {"batches": self._batches,
                "cursors": {bucket_key(b.size): c for b, c in zip(self.buckets, self._cursors)},
                "counts": self._counter.as_dict(), "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        input_pipeline.check_resume_fingerprint(state["pipeline"], self._fingerprint)
        self._batches = int(state["batches"])
        self._cursors = [int(state["cursors"][bucket_key(b.size)]) for b in self.buckets]
        self._counter.load(state["counts"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _prepare_for(prepare, size: Size, time_ids_for: Callable | None):
    """The example preparation of one bucket: its size (images; latents were encoded at it),
    and SDXL's target size in time_ids."""
    time_ids = time_ids_for(size) if time_ids_for is not None else None
    if isinstance(prepare, input_pipeline.PrepareImage):
        return dataclasses.replace(prepare, image_size=size, time_ids=time_ids)
    return dataclasses.replace(prepare, time_ids=time_ids)


def _parse_key(key: str) -> Size:
    height, width = key.split("x")
    return int(height), int(width)


def split_by_bucket(data_config, source, split: str, min_count: int = 1) -> list:
    """[(bucket size, the sequence of its examples)] of a source: images by their nearest
    bucket of `data.buckets`, precomputed latents as they were written, dropping the buckets
    of fewer than `min_count` records (their latents cannot move to another bucket)."""
    if isinstance(source, sources.LatentsSource):
        written = source.meta.get("buckets", {}).get(split)
        if not written:
            raise ValueError(f"data.path={data_config.path!r} was written without aspect "
                             "buckets: rewrite it with data.buckets set, or turn them off "
                             "with --config.data.buckets.pixels=0")
        parts = [(_parse_key(key), sources.LatentsSource(data_config.path, split, bucket=key))
                 for key in written]
        thin = [bucket_key(size) for size, part in parts if len(part) < min_count]
        if thin:
            log.warning("aspect buckets %s hold fewer than %d latents (one per process): "
                        "not trained on", ", ".join(thin), min_count)
        return [(size, part) for size, part in parts if len(part) >= min_count]
    sizes = bucket_sizes(data_config.buckets)
    assignment = assign(image_sizes(source), sizes, min_count=min_count)
    return [(sizes[i], _Subset(source, np.flatnonzero(assignment == i)))
            for i in np.unique(assignment)]


def iterate_buckets(data_config, text, split: str, time_ids_for: Callable | None = None):
    """(bucket "HxW", (its images prepared deterministically at it: center crop, no flip,
    the real caption; the counter that saw them))) for each bucket holding images of
    `split`: what precompute.write_latents encodes."""
    source = input_pipeline.make_source(data_config, split)
    prepare = input_pipeline.make_prepare(data_config, text, source)
    for size, part in split_by_bucket(data_config, source, split):
        yield bucket_key(size), input_pipeline.prepared_rows(
            part, _prepare_for(prepare, size, time_ids_for))


def make_train_iterator(data_config, text, *, process_index: int = 0, process_count: int = 1,
                        time_ids_for: Callable[[Size], Any] | None = None) -> BucketIterator:
    """input_pipeline.make_train_iterator with aspect-ratio buckets: this process's infinite
    batches of batch_size // process_count rows, each from one bucket of `data.buckets` (or,
    from precomputed latents, of those they were written with). `time_ids_for`: bucket
    (height, width) -> the time_ids function of images trained at it (system.time_ids_fn),
    None: no micro-conditioning."""
    input_pipeline._check_config(data_config, process_count)
    if data_config.num_workers:
        raise ValueError(f"data.num_workers={data_config.num_workers}: with data.buckets the "
                         "examples are read by threads of this process; set it to 0")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    source = input_pipeline.make_source(data_config, data_config.split)
    if len(source) < process_count:
        raise ValueError(f"{process_count} processes need at least as many examples; the "
                         f"dataset has {len(source)}")
    if isinstance(source, sources.LatentsSource) and time_ids_for is not None and not (
            source.meta.get("micro_conditioning")):
        raise ValueError(f"{data_config.path} holds no image sizes and crops: rewrite the "
                         "latents with `diffusion-jax precompute` and this config")
    prepare = input_pipeline.make_prepare(data_config, text, source)
    seed, buckets = data_config.seed, []
    for size, part in split_by_bucket(data_config, source, data_config.split, process_count):
        shard = grain.MapDataset.source(part)[process_index::process_count]
        stream = (input_pipeline.EpochShuffle(shard, seed=_seed(seed, process_index, *size, 0))
                  .repeat(None)
                  .random_map(_prepare_for(prepare, size, time_ids_for),
                              seed=_seed(seed, process_index, *size, 1)))
        buckets.append(Bucket(size, len(part), stream, len(shard)))
    if not buckets:
        raise ValueError(f"data.path={data_config.path!r}: no aspect bucket holds at least "
                         f"{process_count} examples")
    log.info("aspect buckets (examples): %s", ", ".join(
        f"{bucket_key(b.size)} ({b.population})" for b in buckets))
    batch_size = data_config.batch_size // process_count
    fingerprint = {"source": data_config.source, "path": data_config.path,
                   "split": data_config.split, "len_dataset": len(source),
                   "random_crop": data_config.random_crop, "random_flip": data_config.random_flip,
                   "min_image_size": data_config.min_image_size,
                   "caption_dropout": data_config.caption_dropout, "seed": data_config.seed,
                   "batch_size": batch_size, "process_index": process_index,
                   "process_count": process_count, "num_workers": data_config.num_workers,
                   "buckets": {bucket_key(b.size): b.population for b in buckets}}
    # The bucket of a batch: the same seed on every process, so all draw the same shape.
    return BucketIterator(buckets, batch_size=batch_size, seed=_seed(seed, 2**31),
                          fingerprint=fingerprint, read_threads=source.read_threads)

"""Precomputed latents: a one-off pass that encodes a dataset with the frozen VAE (and,
optionally, the frozen text towers) and writes array_record files, as large trainers do to
save the VAE and text-encoder cost of every step. Two writers of one format: `write_latents`
for the image sources of the data config, and `plan_webdataset` + `encode_shards` (the
`diffusion-jax precompute` command) for WebDataset tar shards, per shard and per process.

`write_latents` writes, into the folder `out_path`, `{split}.array_record` for the training and
the eval split (one record per example: "latents", every text tower's ids ("input_ids",
"input_ids_2", ...), "label", with a `text_fn` the conditioning ("context", the towers'
outputs joined, and "pooled" where one gives it) and, for SDXL's micro-conditioning, the
image's "original_size" and "crop_top_left"), `latents.json` (what was written) and, with a
`text_fn`, `null_context.npy` (+ `null_pooled.npy`: the empty caption's conditioning, which
caption dropout swaps in). With `data.buckets` the training split is written one
`{split}-HxW.array_record` per aspect bucket (data/buckets.py), its images encoded at that
size. Training reads them back with `data.source = "latents"` and
`data.path = out_path`. Images are encoded deterministically (center crop, no flip): the flip
and crop augmentation is fixed at writing time, as in those trainers.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from diffusion_jax.data import buckets, input_pipeline, sources

log = logging.getLogger(__name__)


def _padded_batches(rows, batch_size: int):
    """(batch of exactly batch_size rows, number of real rows): the last batch is padded by
    repeating its final row, so a jit-compiled encode_fn sees one shape."""
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield input_pipeline.stack_rows(batch), batch_size
            batch = []
    if batch:
        real = len(batch)
        yield input_pipeline.stack_rows(batch + [batch[-1]] * (batch_size - real)), real


def _ids_lengths(tokenizers: dict) -> dict:
    """latents.json's (and a shard's settings') ids lengths: `max_length` for one text
    tower's `input_ids`, as written before two towers; `max_lengths` by ids key otherwise."""
    lengths = {key: tokenizer.max_length for key, tokenizer in tokenizers.items()}
    if list(lengths) == ["input_ids"]:
        return {"max_length": lengths["input_ids"]}
    return {"max_lengths": lengths}


def _record(batch: dict, cond: dict | None, i: int, ids_keys) -> dict:
    """Row i of an encoded batch as a record: latents, ids, label, the conditioning and,
    where the rows carry them, the image's size and crop."""
    record = {"latents": batch["latents"][i], **{key: batch[key][i] for key in ids_keys},
              "label": batch["label"][i]}
    record.update({key: value[i] for key, value in (cond or {}).items()})
    record.update({key: batch[key][i] for key in input_pipeline.MICRO_KEYS if key in batch})
    return record


def _write_null_cond(out: Path, text_fn, tokenizers: dict) -> list[str]:
    """The empty caption's conditioning, one .npy per cond key (atomically: several processes
    may finalize at once); returns the keys."""
    null = text_fn({key: tokenizer([""]) for key, tokenizer in tokenizers.items()})
    for key, value in null.items():
        tmp = out / f"{sources.NULL_COND[key]}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(value, np.float32)[0])
        os.replace(tmp, out / sources.NULL_COND[key])
    return list(null)


def _write_records(path: Path, rows, encode_fn, text_fn, tokenizers: dict,
                   batch_size: int) -> None:
    """One array_record file of the encoded rows, in batches of batch_size rows."""
    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for batch, real in _padded_batches(rows, batch_size):
            batch["latents"] = np.asarray(encode_fn(batch["image"]), np.float32)
            cond = None if text_fn is None else text_fn({k: batch[k] for k in tokenizers})
            for i in range(real):
                writer.write(sources.encode_record(_record(batch, cond, i, tokenizers)))
    finally:
        writer.close()


def write_latents(encode_fn: Callable[[np.ndarray], np.ndarray],
                  text_fn: Callable[[dict], dict] | None,
                  data_config, text, out_path,
                  time_ids: input_pipeline.TimeIds | None = None) -> dict:
    """Encodes `data_config.split` and `data_config.eval_split`; returns what latents.json says.

    encode_fn: images float32 [B, H, W, 3] in [-1, 1] -> latents [B, h, w, c], stored as
      returned (scale them, or sample the posterior, inside encode_fn as training expects).
    text_fn: {ids key: int32 [B, L]} -> the conditioning {"context": [B, L, D][, "pooled":
      [B, P]]}, or None to store only the ids.
    text: a `system.TextInputs` (every text tower's ids) or one tokenizer (`input_ids`).
    time_ids: records also hold each image's original size and crop (SDXL), see
      input_pipeline.PrepareImage.
    With data.buckets, the training split is written one file per aspect bucket, its images
    encoded at it, `{split}-HxW.array_record`, listed in latents.json's `buckets`.
    Batches have data_config.batch_size rows.
    """
    if data_config.source == "latents":
        raise ValueError("data.source='latents' is already precomputed; point write_latents at "
                         "an image source (fashion_mnist, folder, tfds)")
    tokenizers = input_pipeline.text_tokenizers(text)
    out = Path(out_path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / sources.LATENTS_META).unlink(missing_ok=True)  # until the new files are complete
    meta = {"source": data_config.source, "path": data_config.path,
            "image_size": data_config.image_size, **_ids_lengths(tokenizers),
            "has_context": text_fn is not None, "micro_conditioning": time_ids is not None,
            "splits": {}, "skipped": {}, "files": {}}
    splits = dict.fromkeys([(data_config.split, False), (data_config.eval_split, True)])
    for split, held_out in splits:
        if held_out or not buckets.enabled(data_config.buckets):
            parts = [(f"{split}.array_record", input_pipeline.iterate_split(
                data_config, text, split, held_out=held_out, time_ids=time_ids))]
        else:  # the held-out split stays square at image_size, as the trainer evaluates
            # Records keep each image's size and crop, not its time_ids: one function will do.
            sizes_and_crops = (lambda size: time_ids) if time_ids is not None else None
            parts, meta["buckets"] = [], {split: {}}
            for key, rows in buckets.iterate_buckets(data_config, text, split, sizes_and_crops):
                parts.append((f"{split}-{key}.array_record", rows))
                meta["buckets"][split][key] = [parts[-1][0]]
        meta["files"][split], meta["splits"][split], meta["skipped"][split] = [], 0, {}
        for name, (rows, counter) in parts:
            _write_records(out / name, rows, encode_fn, text_fn, tokenizers,
                           data_config.batch_size)
            meta["files"][split].append(name)
            meta["splits"][split] += counter.examples
            for reason, count in counter.skipped.items():
                meta["skipped"][split][reason] = meta["skipped"][split].get(reason, 0) + count
    if text_fn is not None:
        meta["cond_keys"] = _write_null_cond(out, text_fn, tokenizers)
    # Written last: its presence marks a complete folder for LatentsSource.
    (out / sources.LATENTS_META).write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------- WebDataset shards
#
# `diffusion-jax precompute --from webdataset SPEC`: every input shard NNNNN (its index in the
# spec) becomes `{split}-NNNNN.array_record` and `{eval_split}-NNNNN.array_record` (the
# data.eval_fraction held out by key hash) and then `shard-NNNNN.json`, its counts and the
# settings it was written with. Each is written under a temporary name and renamed, and the
# JSON comes last, so its presence marks a finished shard: a rerun skips it. Process i of n
# takes shards i::n; no process waits for another: whichever finds every shard finished when
# it is done writes null_context.npy and latents.json (identical from any of them).

SHARD_STATS = "shard-{:05d}.json"
RECORD_FILE = "{}-{:05d}.array_record"
BUCKET_RECORD_FILE = "{}-{}-{:05d}.array_record"  # split, bucket "HxW", shard


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What `plan_webdataset` checked: the shards, this process's part and the settings."""

    spec: str
    out: Path
    shards: list[tuple[int, str]]      # (index in the spec, url) of every existing shard
    mine: list[tuple[int, str]]        # this process's
    todo: list[tuple[int, str]]        # this process's, not finished before
    settings: dict                     # what shapes the records; a rerun must match
    data_config: Any
    process: tuple[int, int]


def _writable_dir(path) -> Path:
    if "://" in str(path):
        raise ValueError(f"--out {path}: array_record files are written to a local disk; write "
                         "them locally (or to a gcsfuse mount) and copy them")
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write there ({err.strerror or err}); choose a "
                         "directory you can write") from None
    return out


def _read_stats(out: Path, index: int) -> dict | None:
    path = out / SHARD_STATS.format(index)
    return json.loads(path.read_text()) if path.is_file() else None


def _check_finished(stats: dict, url: str, settings: dict, out: Path) -> None:
    """A finished shard must come from the same input and settings as this run."""
    if stats["url"] != url:
        raise ValueError(f"{out} holds shard {stats['index']} of another spec ({stats['url']}, "
                         f"now {url}): use a new --out for a new spec")
    changed = sorted(k for k in settings.keys() | stats["settings"].keys()
                     if settings.get(k) != stats["settings"].get(k))
    if changed:
        raise ValueError(f"{out} holds shards written with other settings ("
                         + ", ".join(f"{k}: {stats['settings'].get(k)!r} there, {settings.get(k)!r} now"
                                     for k in changed)
                         + "): rerun with those, or use a new --out")


def plan_webdataset(spec: str, out_path, data_config, text, model: dict, *,
                    process_index: int = 0, process_count: int = 1) -> ShardPlan:
    """Every check that needs no model: the spec, the shards, the out dir, the config and the
    shards finished before. `model` is frozen_towers.describe(config); `text` as in
    write_latents."""
    from diffusion_jax.data import webdataset_shards

    if buckets.enabled(data_config.buckets):
        buckets.check_config(data_config.buckets)
    urls = webdataset_shards.expand_spec(spec)
    existing = set(webdataset_shards.existing_shards(urls))
    if not existing:
        raise FileNotFoundError(f"shard spec {spec!r} matches no file ({len(urls)} names, e.g. "
                                f"{urls[0]}): check the folder and the brace range")
    if len(existing) < len(urls):
        first = next(u for u in urls if u not in existing)
        log.warning("%d of the %d shards of %r do not exist (e.g. %s); encoding the others",
                    len(urls) - len(existing), len(urls), spec, first)
    input_pipeline._check_config(data_config, 1)
    if data_config.split == data_config.eval_split:
        raise ValueError(f"data.split and data.eval_split are both {data_config.split!r}: "
                         "name the held-out split differently")
    out = _writable_dir(out_path)
    settings = {**model, **_ids_lengths(input_pipeline.text_tokenizers(text)),
                **{k: data_config[k] for k in ("image_size", "random_crop", "min_image_size",
                                               "eval_fraction", "seed", "split", "eval_split")}}
    if buckets.enabled(data_config.buckets):  # as JSON reads them back: lists
        settings["buckets"] = [list(size) for size in buckets.bucket_sizes(data_config.buckets)]
    shards = [(i, u) for i, u in enumerate(urls) if u in existing]
    mine = webdataset_shards.process_shards(shards, process_index, process_count)
    todo = []
    for index, url in mine:
        stats = _read_stats(out, index)
        if stats is None:
            todo.append((index, url))
        else:
            _check_finished(stats, url, settings, out)
    return ShardPlan(spec, out, shards, mine, todo, settings, data_config,
                     (process_index, process_count))


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "big")


def _shard_rows(url: str, prepare_for: Callable, data_config,
                counters: dict[bool, input_pipeline.ExampleCounter]):
    """(record file, prepared row {"image", "input_ids", "label", ...}) of each sample of one
    shard, counting skips and conversions per split (a tar-level problem, having no key, in
    the train split). `prepare_for(example, held_out)` -> (file, the PrepareImage for it).
    Training rows are cropped at a position drawn from (seed, key hash) when random_crop is
    on, so a rerun crops alike; held-out rows centrally, as eval images are."""
    from diffusion_jax.data import webdataset_shards

    for key, example in webdataset_shards.read_shard(url):
        held = key is not None and sources.held_out(key, data_config.eval_fraction)
        rng = None
        if data_config.random_crop and key is not None and not held:
            rng = np.random.default_rng([data_config.seed, _key_seed(key)])
        name, prepare = prepare_for(example, held)
        prepared = prepare(example, rng)
        if isinstance(prepared, sources.Skipped):
            counters[held].skip(prepared)
            continue
        counters[held].keep(prepared)
        yield name, prepared.arrays


def _shard_preparation(plan: ShardPlan, index: int, prepare: input_pipeline.PrepareImage):
    """(example, held out) -> (record file, its PrepareImage) for shard `index`: held-out
    images square at data.image_size (as the trainer evaluates); training images at
    data.image_size too, or with data.buckets at their nearest bucket, one file per bucket
    (its population is not known while streaming, so no bucket is dropped here: the trainer
    skips one with fewer latents than processes)."""
    config = plan.data_config
    square = {False: RECORD_FILE.format(config.split, index),
              True: RECORD_FILE.format(config.eval_split, index)}
    if not buckets.enabled(config.buckets):
        return lambda example, held: (square[held], prepare)
    sizes = buckets.bucket_sizes(config.buckets)
    at_bucket = [(BUCKET_RECORD_FILE.format(config.split, buckets.bucket_key(size), index),
                  dataclasses.replace(prepare, image_size=size)) for size in sizes]

    def prepare_for(example, held):
        if held or isinstance(example, sources.Skipped):
            return square[held], prepare
        return at_bucket[int(buckets.nearest([example.image.shape[:2]], sizes)[0])]

    return prepare_for


def _counts_since(counter: input_pipeline.ExampleCounter, before: dict) -> dict:
    after = counter.as_dict()
    return {"examples": after["examples"] - before["examples"],
            **{kind: dict(collections.Counter(after[kind]) - collections.Counter(before[kind]))
               for kind in ("skipped", "converted")}}


def _encode_shard(plan: ShardPlan, index: int, url: str, encode_fn, text_fn, prepare,
                  counters, progress) -> None:
    ids_keys = prepare.caption_ids.tokenizers
    config, out = plan.data_config, plan.out
    before = {held: c.as_dict() for held, c in counters.items()}
    # Every shard writes its square files, empty ones too (the held-out split's and, without
    # buckets, the training split's); with buckets, a file per bucket its images went to.
    names = [RECORD_FILE.format(config.eval_split, index)]
    if not buckets.enabled(config.buckets):
        names.append(RECORD_FILE.format(config.split, index))
    writers = {name: ArrayRecordWriter(str(out / (name + ".tmp")), "group_size:1")
               for name in names}
    pending = collections.defaultdict(list)  # file -> rows not yet encoded (one shape each)

    def write(name, rows):
        batch, real = next(_padded_batches(rows, config.batch_size))
        batch["latents"] = encode_fn(batch["image"])
        cond = text_fn({key: batch[key] for key in ids_keys})
        if name not in writers:
            writers[name] = ArrayRecordWriter(str(out / (name + ".tmp")), "group_size:1")
        for i in range(real):
            writers[name].write(sources.encode_record(_record(batch, cond, i, ids_keys)))
        progress.update(real)

    try:
        rows = _shard_rows(url, _shard_preparation(plan, index, prepare), config, counters)
        for name, row in rows:
            pending[name].append(row)
            if len(pending[name]) == config.batch_size:
                write(name, pending.pop(name))
        for name, left in pending.items():
            write(name, left)
    finally:
        for writer in writers.values():
            writer.close()
    for name in writers:
        os.replace(out / (name + ".tmp"), out / name)
    stats = {"index": index, "url": url, "settings": plan.settings,
             "splits": {(config.eval_split if held else config.split): _counts_since(c, before[held])
                        for held, c in counters.items()}}
    if buckets.enabled(config.buckets):  # bucket "HxW" -> its file, for the buckets written
        stats["buckets"] = {name.split("-")[-2]: name for name in sorted(writers)
                            if name not in names}
    _write_json(out / SHARD_STATS.format(index), stats)


def _write_json(path: Path, value: dict) -> None:
    """Atomically, and safely beside another process writing the same file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def encode_shards(plan: ShardPlan, encode_fn, text_fn, text,
                  time_ids: input_pipeline.TimeIds | None = None) -> dict:
    """Encodes this process's unfinished shards, then finalizes if every shard is done.
    encode_fn / text_fn / text / time_ids as in write_latents (frozen_towers.frozen_encoders,
    frozen_towers.time_ids). Returns
    {"written", "skipped", "converted" (this run), "shards_done", "shards_failed",
    "finalized"}."""
    from tqdm import tqdm

    config = plan.data_config
    prepare = input_pipeline.PrepareImage(config.image_size, config.random_crop, random_flip=False,
                                    caption_dropout=0.0, caption_ids=input_pipeline.CaptionIds(text),
                                    min_image_size=config.min_image_size, time_ids=time_ids)
    counters = {False: input_pipeline.ExampleCounter(), True: input_pipeline.ExampleCounter()}
    index, count = plan.process
    failed = []
    already = len(plan.mine) - len(plan.todo)
    desc = f"precompute {len(plan.todo)} shards" + (f" (process {index} of {count})" if count > 1 else "")
    with tqdm(desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, mininterval=2.0) as progress:
        for done, (shard_index, url) in enumerate(plan.todo, 1):
            try:
                _encode_shard(plan, shard_index, url, encode_fn, text_fn, prepare, counters, progress)
            except OSError as err:  # unreadable or gone: left unfinished, a rerun retries it
                failed.append(url)
                log.warning("shard %s not finished (%s); rerun to retry it", url, err)
                continue
            # ETA from the images per shard so far (the count per shard is not known ahead)
            progress.total = round(progress.n / (done - len(failed)) * len(plan.todo))
            progress.refresh()
    totals = [c.as_dict() for c in counters.values()]
    result = {"written": sum(t["examples"] for t in totals),
              "skipped": dict(sum((collections.Counter(t["skipped"]) for t in totals), collections.Counter())),
              "converted": dict(sum((collections.Counter(t["converted"]) for t in totals), collections.Counter())),
              "shards_done": len(plan.todo) - len(failed), "shards_before": already,
              "shards_failed": failed}
    result["finalized"] = finalize(plan, text_fn, text, micro_conditioning=time_ids is not None)
    return result


def finalize(plan: ShardPlan, text_fn, text, micro_conditioning: bool = False) -> bool:
    """Writes the empty caption's conditioning (null_context.npy, ...) and then latents.json
    if every shard of the spec is finished (by any process); returns whether it did."""
    stats = [_read_stats(plan.out, index) for index, _ in plan.shards]
    if any(s is None for s in stats):
        return False
    for s, (_, url) in zip(stats, plan.shards):
        _check_finished(s, url, plan.settings, plan.out)
    config = plan.data_config
    tokenizers = input_pipeline.text_tokenizers(text)
    meta = {"source": "webdataset", "path": plan.spec, "image_size": config.image_size,
            **_ids_lengths(tokenizers), "has_context": True,
            "micro_conditioning": micro_conditioning, "shards": len(stats),
            "settings": plan.settings, "splits": {}, "skipped": {}, "converted": {}, "files": {}}
    for split in (config.split, config.eval_split):
        counts = [s["splits"][split] for s in stats]
        meta["splits"][split] = sum(c["examples"] for c in counts)
        for kind in ("skipped", "converted"):
            meta[kind][split] = dict(sorted(sum((collections.Counter(c[kind]) for c in counts),
                                                collections.Counter()).items()))
        meta["files"][split] = [RECORD_FILE.format(split, s["index"]) for s in stats]
    if buckets.enabled(config.buckets):  # the training split: a list of files per bucket
        written = collections.defaultdict(list)
        for s in stats:
            for key, name in s["buckets"].items():
                written[key].append(name)
        meta["buckets"] = {config.split: dict(sorted(written.items()))}
        meta["files"][config.split] = [name for names in written.values() for name in names]
    meta["cond_keys"] = _write_null_cond(plan.out, text_fn, tokenizers)
    _write_json(plan.out / sources.LATENTS_META, meta)  # last: it marks the folder complete
    return True

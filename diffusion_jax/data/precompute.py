"""Precomputed latents: a one-off pass that encodes a dataset with the frozen VAE (and,
optionally, the frozen text encoder) and writes array_record files, as large trainers do to
save the VAE and text-encoder cost of every step.

`write_latents` writes, into the folder `out_path`, `{split}.array_record` for the training and
the eval split (one record per example: "latents", "input_ids", "label" and, with a `text_fn`,
"context"), `latents.json` (what was written) and, with a `text_fn`, `null_context.npy` (the
empty caption's context, which caption dropout swaps in). Training reads them back with
`data.source = "latents"` and `data.path = out_path`: batches are then {"latents", "input_ids",
"label"[, "context"]}. Images are encoded deterministically (center crop, no flip): the flip
and crop augmentation is fixed at writing time, as in those trainers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from diffusion_jax.data import pipeline, sources


def _padded_batches(rows, batch_size: int):
    """(batch of exactly batch_size rows, number of real rows): the last batch is padded by
    repeating its final row, so a jit-compiled encode_fn sees one shape."""
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield pipeline.stack_rows(batch), batch_size
            batch = []
    if batch:
        real = len(batch)
        yield pipeline.stack_rows(batch + [batch[-1]] * (batch_size - real)), real


def write_latents(encode_fn: Callable[[np.ndarray], np.ndarray],
                  text_fn: Callable[[np.ndarray], np.ndarray] | None,
                  data_config, tokenizer, out_path) -> dict:
    """Encodes `data_config.split` and `data_config.eval_split`; returns what latents.json says.

    encode_fn: images float32 [B, H, W, 3] in [-1, 1] -> latents [B, h, w, c], stored as
      returned (scale them, or sample the posterior, inside encode_fn as training expects).
    text_fn: input_ids int32 [B, L] -> context [B, L, D], or None to store only input_ids.
    Batches have data_config.batch_size rows.
    """
    if data_config.source == "latents":
        raise ValueError("data.source='latents' is already precomputed; point write_latents at "
                         "an image source (fashion_mnist, folder, tfds)")
    out = Path(out_path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / sources.LATENTS_META).unlink(missing_ok=True)  # until the new files are complete
    meta = {"source": data_config.source, "path": data_config.path,
            "image_size": data_config.image_size, "max_length": tokenizer.max_length,
            "has_context": text_fn is not None,
            "splits": {}, "skipped": {}, "files": {}}
    splits = dict.fromkeys([(data_config.split, False), (data_config.eval_split, True)])
    for split, held_out in splits:
        rows, counter = pipeline.iterate_split(data_config, tokenizer, split, held_out=held_out)
        writer = ArrayRecordWriter(str(out / f"{split}.array_record"), "group_size:1")
        try:
            for batch, real in _padded_batches(rows, data_config.batch_size):
                latents = np.asarray(encode_fn(batch["image"]), np.float32)
                context = None if text_fn is None else np.asarray(text_fn(batch["input_ids"]), np.float32)
                for i in range(real):
                    record = {"latents": latents[i], "input_ids": batch["input_ids"][i],
                              "label": batch["label"][i]}
                    if context is not None:
                        record["context"] = context[i]
                    writer.write(sources.encode_record(record))
        finally:
            writer.close()
        meta["splits"][split] = counter.examples
        meta["files"][split] = [f"{split}.array_record"]
        meta["skipped"][split] = dict(counter.skipped)
    if text_fn is not None:
        np.save(out / sources.NULL_CONTEXT, np.asarray(text_fn(tokenizer([""])), np.float32)[0])
    # Written last: its presence marks a complete folder for LatentsSource.
    (out / sources.LATENTS_META).write_text(json.dumps(meta, indent=2))
    return meta

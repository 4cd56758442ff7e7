"""WebDataset tar shards (img2dataset's output) as streams of decoded examples.

A shard is a tar of samples, each the members sharing a key (the name up to its first dot):
`000000123.jpg` with `000000123.txt` and/or `000000123.json`. A spec names shards with brace
expansion, `/data/laion/{00000..01023}.tar` or `gs://bucket/laion/{00000..01023}.tar`
(webdataset's own expansion, `::` between lists). Shards are opened with etils.epath
(checkpoint.as_path), so gs:// goes through gcsfs like every other remote path here
(webdataset reaches gs:// through a `gsutil` pipe), and read as a stream: one pass, no seeking.

Caption: the `.txt` member, else the "caption" (or "text") field of the `.json` member; none:
"" and the conversion missing_caption, as FolderSource does. Bad data is a `sources.Skipped`,
never an exception: an image that does not decode gets the sources' reasons (corrupt,
truncated, not_an_image, ...); a sample without an image member is missing_image; a tar
stream that breaks off (a truncated download) ends the shard with one bad_tar, the samples
before it kept. A corrupt tar header costs only its member: tarfile's ignore_zeros steps to
the next good header, where webdataset's reader would end the shard without a word.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import zlib
from typing import Iterator

from diffusion_jax import checkpoint
from diffusion_jax.data import sources
from diffusion_jax.data.sources import Example, Skipped

IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in sources.IMAGE_EXTENSIONS)
CAPTION_JSON_KEYS = ("caption", "text")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# A stream that is not, or stops being, a tar: the shard's end, counted as bad_tar. Other
# OSErrors (a lost connection) propagate, so the shard is retried rather than cut short.
_BROKEN_TAR = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def expand_spec(spec: str) -> list[str]:
    """The shard paths or URLs a spec names, in order; a clear error for a malformed spec."""
    from webdataset.shardlists import expand_urls

    example = "e.g. '/data/laion/{00000..01023}.tar' or 'gs://bucket/laion/{00000..01023}.tar'"
    if not spec.strip():
        raise ValueError(f"the shard spec is empty: name the tar shards, {example}")
    if spec.startswith("pipe:"):
        raise ValueError(f"shard spec {spec!r}: pipe: commands are not run; name the shards "
                         f"as files or gs:// objects, {example}")
    try:
        urls = expand_urls(spec)
    except ValueError:  # braceexpand's UnbalancedBracesError, its only one
        raise ValueError(f"shard spec {spec!r} has unbalanced braces: write a range as "
                         "{00000..01023}") from None
    not_shards = [u for u in urls if not u.endswith(SHARD_SUFFIXES)]
    if not_shards:
        raise ValueError(f"shard spec {spec!r} names {not_shards[0]!r}, not a tar shard "
                         f"({', '.join(SHARD_SUFFIXES)}): name the shards, {example}")
    return urls


def existing_shards(urls: list[str]) -> list[str]:
    """The shards of `urls` that exist, by listing each folder once (one request per folder
    on GCS, not one per shard)."""
    listed: dict[str, set[str]] = {}
    for url in urls:
        parent = os.path.dirname(url)
        if parent not in listed:
            folder = checkpoint.as_path(parent or ".")  # gs:// without gcsfs: the install hint
            listed[parent] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return [u for u in urls if os.path.basename(u) in listed[os.path.dirname(u)]]


def process_shards(indexed_urls: list[tuple[int, str]], process_index: int,
                   process_count: int) -> list[tuple[int, str]]:
    """The (index in the spec, url) pairs process `process_index` of `process_count` takes:
    every process_count-th from its index, so no two processes share a shard."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is not in [0, {process_count})")
    return indexed_urls[process_index::process_count]


def caption_of(sample: dict) -> str | None:
    """The caption of a WebDataset sample, None when it has none."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            fields = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(fields, dict):
            for key in CAPTION_JSON_KEYS:
                if isinstance(fields.get(key), str):
                    return fields[key].strip()
    return None


def decode_sample(sample: dict, name: str) -> Example | Skipped:
    """A grouped sample ({"__key__", "jpg": bytes, "txt": bytes, ...}) -> Example | Skipped."""
    suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if suffix is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return Skipped("missing_image", name, f"no image member, only {members}")
    caption = caption_of(sample)
    missing = () if caption is not None else ("missing_caption",)
    return sources.decode_image_bytes(sample[suffix], name, caption or "", conversions=missing)


def _tar_members(stream, url: str, problems: list[Skipped]) -> Iterator[dict]:
    """{"fname", "data", "__url__"} of each file in a tar stream (what webdataset's
    group_by_keys takes), until the stream ends or breaks off (then one bad_tar in
    `problems`: ending normally lets group_by_keys still yield the last whole sample)."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True)
        for info in tar:
            if info.isreg():
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # a stream: keep no index of the members read
    except _BROKEN_TAR as err:
        problems.append(Skipped("bad_tar", os.path.basename(url), f"{type(err).__name__}: {err}"))


def read_shard(url: str) -> Iterator[tuple[str | None, Example | Skipped]]:
    """(sample key, decoded sample) for every sample of one shard, in tar order; the key is
    None for a problem of the tar itself. An OSError opening or reading the shard propagates."""
    from webdataset.tariterators import group_by_keys

    shard = os.path.basename(url)
    problems: list[Skipped] = []

    def on_error(err: Exception) -> bool:  # group_by_keys': e.g. a member name twice
        problems.append(Skipped("bad_tar", shard, f"{type(err).__name__}: {err}"))
        return True  # keep reading

    with checkpoint.as_path(url).open("rb") as stream:
        for sample in group_by_keys(_tar_members(stream, url, problems), handler=on_error):
            yield from ((None, p) for p in problems)
            problems.clear()
            key = sample["__key__"]
            yield key, decode_sample(sample, f"{shard}/{key}")
    yield from ((None, p) for p in problems)

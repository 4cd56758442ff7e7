"""Tokenizers of the text towers: CLIP BPE over the bundled vocabulary, equal to transformers'
`CLIPTokenizer`; T5's SentencePiece model read from a checkpoint's folder (`T5Tokenizer`).

The vocabulary is openai/CLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped in `assets/`; it is
turned into a 49408-entry vocab and 48894 merges exactly as openai/CLIP's `simple_tokenizer`
does. The pipeline is built on the `tokenizers` library with the same components as
transformers 5's `CLIPTokenizer` (a BPE model with the `</w>` end-of-word suffix over GPT-2's
byte-to-unicode alphabet), so the ids are those a diffusers pipeline feeds its text encoder.

Text cleaning is what transformers 5 does (it has no ftfy-dependent slow tokenizer any more):
NFC, whitespace runs collapsed to one space, per-character lowercase. openai/CLIP also runs
`ftfy.fix_text` (straightens curly quotes, narrows full-width characters, drops control
characters, repairs mojibake) and `html.unescape`; transformers does neither, so neither do we:
`it’s` and `&amp;` are tokenized as written, as in every diffusers pipeline.

The padding token follows the checkpoint: SD 1.x pads with `<|endoftext|>`, SD 2.x with "!"
(id 0). Like transformers, the padding token is a special token, so with "!" padding a "!"
in a prompt becomes id 0 (the bare "!"), not 256 ("!" ending a word) as openai/CLIP would
give; that is what a diffusers SD 2.x pipeline feeds its text encoder.

No T5 vocabulary ships with the package: `T5Tokenizer.from_pretrained` reads the Flux / SD3
checkpoint's `tokenizer_2/` or `tokenizer_3/` folder, its `tokenizer.json` through the
`tokenizers` library, or, where that is absent, its `spiece.model` through `sentencepiece`.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BUNDLED_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
# openai/CLIP keeps the first 49152 - 256 - 2 merges of the file: 256 byte symbols, their 256
# end-of-word forms, the merges and BOS/EOS make the text encoder's 49408 embeddings.
NUM_MERGES = 49152 - 256 - 2
# openai/CLIP's word splitting (special tokens, contractions, letter runs, single digits,
# other-symbol runs), as transformers writes it.
_CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# transformers writes model_max_length = int(1e30) when none is set: that large means unset.
_UNSET_MAX_LENGTH = int(1e20)


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return dict(zip(printable + others, map(chr, chars)))


def read_bpe_vocab(
        path: str | os.PathLike = BUNDLED_VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from a `bpe_simple_vocab_16e6.txt.gz`, as openai/CLIP builds them."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0: version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> Tokenizer:
    """The `tokenizers` pipeline of transformers' CLIPTokenizer, component for component."""
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                            end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=EOS_TOKEN))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    # The byte-level step keeps its GPT-2 regex (use_regex=True) as transformers does: it
    # splits nothing openai's split produced, except an upper-case "<|ENDOFTEXT|>" that
    # lowercasing turned into a special-token lookalike.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # transformers registers the padding token as special too: with "!" padding a "!" in the
    # text is matched before BPE and becomes id 0.
    special_tokens = dict.fromkeys([pad_token, BOS_TOKEN, EOS_TOKEN])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return backend


def _token_content(entry) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it."""
    return entry["content"] if isinstance(entry, dict) else entry


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_folder_vocab(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges from vocab.json + merges.txt, or from a tokenizer.json alone (what
    transformers 5's save_pretrained writes)."""
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        vocab = _read_json(directory / "vocab.json")
        with open(directory / "merges.txt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return vocab, merges
    if (directory / "tokenizer.json").exists():
        model = _read_json(directory / "tokenizer.json")["model"]
        merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
        return model["vocab"], merges
    raise FileNotFoundError(f"{directory} holds neither vocab.json + merges.txt nor tokenizer.json")


class CLIPTokenizer:
    """Prompts -> int32 ids [B, max_length]: BOS, BPE tokens, EOS, then padding."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 pad_token: str = EOS_TOKEN, max_length: int = DEFAULT_MAX_LENGTH):
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the vocabulary: not a CLIP vocabulary")
        if max_length < 2:
            raise ValueError(f"max_length={max_length}: needs room for BOS and EOS")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.pad_token = pad_token
        self.max_length = max_length
        self.bos_token_id = self.vocab[BOS_TOKEN]
        self.eos_token_id = self.vocab[EOS_TOKEN]
        self.pad_token_id = self.vocab[pad_token]
        self._backend = _build_backend(self.vocab, self.merges, pad_token)

    @classmethod
    def bundled(cls, pad_token: str = EOS_TOKEN,
                max_length: int = DEFAULT_MAX_LENGTH) -> CLIPTokenizer:
        """The shipped openai/CLIP vocabulary; pad_token "<|endoftext|>" for SD 1.x, "!" for SD 2.x."""
        if pad_token not in (EOS_TOKEN, "!"):
            raise ValueError(f"pad_token={pad_token!r}: supported are {EOS_TOKEN!r} (SD 1.x) and '!' (SD 2.x)")
        vocab, merges = read_bpe_vocab()
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, max_length: int | None = None) -> CLIPTokenizer:
        """Reads a transformers / diffusers tokenizer folder (e.g. a checkpoint's `tokenizer/`).

        The padding token is taken as transformers takes it: special_tokens_map.json over
        tokenizer_config.json (SD 2.x folders disagree between the two, and "!" wins).
        max_length defaults to the folder's model_max_length, else 77.
        """
        directory = Path(directory)
        config = _read_json(directory / "tokenizer_config.json")
        special = _read_json(directory / "special_tokens_map.json")
        pad_token = _token_content(special.get("pad_token", config.get("pad_token"))) or EOS_TOKEN
        if max_length is None:
            folder_length = config.get("model_max_length", _UNSET_MAX_LENGTH)
            max_length = DEFAULT_MAX_LENGTH if folder_length >= _UNSET_MAX_LENGTH else int(folder_length)
        vocab, merges = _read_folder_vocab(directory)
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the four files of an SD checkpoint's `tokenizer/` folder (vocab.json, merges.txt,
        tokenizer_config.json, special_tokens_map.json): a diffusers pipeline folder loads it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, indent=2, sort_keys=True, ensure_ascii=False)
        with open(directory / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                   "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special}
        for name, content in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
            with open(directory / name, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """int32 [B, max_length]. A prompt too long keeps its first max_length - 2 tokens and
        its EOS (as transformers truncates), with a warning naming what was dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, encoding in enumerate(self._backend.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = encoding.ids
            if len(tokens) > room:
                dropped = tokens[room:]
                warnings.warn(
                    f"prompt {row} is {len(tokens)} tokens, CLIP takes {room}: dropped the last "
                    f"{len(dropped)} tokens ({self.decode(dropped)!r})", stacklevel=2)
                tokens = tokens[:room]
            ids[row, :len(tokens) + 2] = [self.bos_token_id, *tokens, self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Text of one id sequence (a str) or of a batch [B, L] (a list). A leading BOS is
        dropped and the sequence ends at its first EOS, so padding never shows."""
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        tokens = [int(i) for i in ids]
        if tokens and tokens[0] == self.bos_token_id:
            tokens = tokens[1:]
        if self.eos_token_id in tokens:
            tokens = tokens[:tokens.index(self.eos_token_id)]
        text = self._backend.decode(tokens, skip_special_tokens=False)
        return text.replace(END_OF_WORD, " ").strip()


# T5's special tokens as transformers' T5Tokenizer names them (folders may say otherwise).
T5_EOS_TOKEN = "</s>"
T5_PAD_TOKEN = "<pad>"
# The length T5 was pre-trained at: the default where a folder sets no model_max_length.
T5_DEFAULT_MAX_LENGTH = 512


class _TokenizersBackend:
    """A `tokenizer.json` (the Unigram model with its normalizer, pre-tokenizer and added
    tokens, the sentinels `<extra_id_N>` among them) as the `tokenizers` library runs it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()  # the file may carry settings; lengths are ours
        self.tokenizer.no_padding()

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A `spiece.model` as SentencePiece runs it. Its pieces are all it knows: the sentinels
    that transformers adds as special tokens (`<extra_id_N>`, no prompt holds them) are not
    matched in text."""

    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError as e:  # a dependency of the package; say so if it is missing
            raise ImportError(f"{path.parent} holds only spiece.model, which needs the "
                              "sentencepiece package (pip install sentencepiece)") from e
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return self.processor.encode(prompts)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([i for i in ids if not self.processor.is_control(i)])

    def token_to_id(self, token: str) -> int | None:
        i = self.processor.piece_to_id(token)
        return i if self.processor.id_to_piece(i) == token else None

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()


class T5Tokenizer:
    """Prompts -> int32 ids [B, max_length]: SentencePiece tokens, EOS `</s>`, then padding
    (`<pad>`, id 0), as transformers' T5 tokenizer gives them with `padding="max_length",
    max_length=max_length, truncation=True` (a diffusers Flux / SD3 pipeline's call)."""

    def __init__(self, backend: _TokenizersBackend | _SentencePieceBackend, *,
                 eos_token: str = T5_EOS_TOKEN, pad_token: str = T5_PAD_TOKEN,
                 max_length: int = T5_DEFAULT_MAX_LENGTH):
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: needs room for EOS")
        ids = {token: backend.token_to_id(token) for token in (eos_token, pad_token)}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"token(s) {missing} are not in the vocabulary: not a T5 tokenizer")
        self._backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id, self.pad_token_id = ids[eos_token], ids[pad_token]
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, max_length: int | None = None) -> T5Tokenizer:
        """Reads a transformers T5 tokenizer folder (a checkpoint's `tokenizer_2/` or
        `tokenizer_3/`): tokenizer.json, else spiece.model. The special tokens come from
        special_tokens_map.json over tokenizer_config.json, as transformers takes them;
        max_length defaults to the folder's model_max_length, else 512."""
        directory = Path(directory)
        if (directory / "tokenizer.json").exists():
            backend = _TokenizersBackend(Tokenizer.from_file(str(directory / "tokenizer.json")))
        elif (directory / "spiece.model").exists():
            backend = _SentencePieceBackend(directory / "spiece.model")
        else:
            raise FileNotFoundError(f"{directory} holds neither tokenizer.json nor spiece.model")
        config = _read_json(directory / "tokenizer_config.json")
        special = _read_json(directory / "special_tokens_map.json")
        token = lambda name, default: _token_content(
            special.get(name, config.get(name))) or default
        if max_length is None:
            folder_length = config.get("model_max_length", _UNSET_MAX_LENGTH)
            max_length = (T5_DEFAULT_MAX_LENGTH if folder_length >= _UNSET_MAX_LENGTH
                          else int(folder_length))
        return cls(backend, eos_token=token("eos_token", T5_EOS_TOKEN),
                   pad_token=token("pad_token", T5_PAD_TOKEN), max_length=max_length)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> T5Tokenizer:
        """From a checkpoint's tokenizer section (`to_section`)."""
        if "tokenizer_json" not in section:
            raise ValueError("this config's T5 tokenizer section has no vocabulary "
                             "(tokenizer_json): sample from a converted checkpoint, whose "
                             "section holds its folder's tokenizer.json")
        backend = _TokenizersBackend(Tokenizer.from_str(section["tokenizer_json"]))
        return cls(backend, eos_token=section.get("eos_token", T5_EOS_TOKEN),
                   pad_token=section.get("pad_token", T5_PAD_TOKEN),
                   max_length=section.get("max_length", T5_DEFAULT_MAX_LENGTH))

    def to_section(self) -> dict[str, Any]:
        """The checkpoint's tokenizer section: the whole `tokenizer.json` as a string (no
        T5 vocabulary ships with the package), the special tokens and the length."""
        if not isinstance(self._backend, _TokenizersBackend):
            raise ValueError("a T5 tokenizer read from spiece.model alone cannot be stored in a "
                             "checkpoint: save the folder with transformers' T5TokenizerFast "
                             "first, which writes its tokenizer.json")
        return {"tokenizer_json": self._backend.tokenizer.to_str(), "eos_token": self.eos_token,
                "pad_token": self.pad_token, "max_length": self.max_length}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """A transformers T5TokenizerFast folder: tokenizer.json, tokenizer_config.json and
        special_tokens_map.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        section = self.to_section()
        (directory / "tokenizer.json").write_text(section["tokenizer_json"], encoding="utf-8")
        special = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {**special, "model_max_length": self.max_length,
             "tokenizer_class": "T5Tokenizer"}, indent=2))

    @property
    def vocab_size(self) -> int:
        """Entries of the vocabulary, added tokens included (the T5-XXL embedding has 32,128
        rows for the 32,100 of its tokenizer)."""
        return self._backend.vocab_size

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """int32 [B, max_length]. A prompt too long keeps its first max_length - 1 tokens and
        its EOS (as transformers truncates), with a warning naming what was dropped."""
        return self.encode(prompts)[0]

    def encode(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention_mask), both int32 [B, max_length]; the mask is 1 on the tokens and
        their EOS, 0 on the padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 1
        ids = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(prompts), self.max_length), dtype=np.int32)
        for row, tokens in enumerate(self._backend.encode(list(prompts))):
            if len(tokens) > room:
                dropped = tokens[room:]
                warnings.warn(
                    f"prompt {row} is {len(tokens)} tokens, T5 takes {room} here: dropped the "
                    f"last {len(dropped)} tokens ({self.decode(dropped)!r})", stacklevel=2)
                tokens = tokens[:room]
            ids[row, :len(tokens) + 1] = [*tokens, self.eos_token_id]
            mask[row, :len(tokens) + 1] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Text of one id sequence (a str) or of a batch [B, L] (a list), up to its first EOS."""
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        tokens = [int(i) for i in ids]
        if self.eos_token_id in tokens:
            tokens = tokens[:tokens.index(self.eos_token_id)]
        return self._backend.decode(tokens)

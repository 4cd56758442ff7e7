"""CLIPTokenizer against transformers' CLIPTokenizer and openai/CLIP's BPE algorithm."""

import gzip
import json
import unicodedata
import warnings

import numpy as np
import pytest
import regex
import transformers

from diffusion_jax.tokenizer import BUNDLED_VOCAB, CLIPTokenizer

PAD_TOKENS = ["<|endoftext|>", "!"]
BOS, EOS = 49406, 49407

LONG_PROMPT = (
    "masterpiece, best quality, ultra-detailed 8k photograph of an ancient stone castle on a "
    "misty mountain at sunrise, volumetric light, golden hour, dramatic clouds, reflections in "
    "a calm lake, pine forest, flock of birds, highly detailed textures, sharp focus, "
    "trending on artstation, by greg rutkowski and alphonse mucha, cinematic composition, "
    "35mm lens, f/1.8, bokeh, hdr, award winning, national geographic, 4k wallpaper"
)
# Python's str.lower gives the final "ς"; tokenizers (hence transformers) lowercases per
# character and gives "σ", another token than openai/CLIP's.
GREEK_FINAL_SIGMA = "Η ΟΔΟΣ"
UPPER_CASE_LOOKALIKE = "UPPER <|ENDOFTEXT|> lookalike"
PROMPTS = [
    "a cute cat",
    "",
    "   A  Cute\tCAT\n\n on   the MAT\u00a0 ",  # whitespace runs (NBSP too), upper case
    "Hello, world! It's a dog's life; don't stop... (really?) #1 @home 50% off: $3.99 -- ok!!",
    "a cat!", "!!!", "hello!world ! wow!?", "<>[]{}|\\/~`^_=+*&",
    "photo of 1984 cars, 3.14159 and 2nd place; 100000 people in 2024-01-31",
    "café naïve résumé Ångström Straße crème brûlée ÉCOLE",
    "cafe\u0301 and e\u0301cole",  # decomposed accents: NFC composes them
    "a cat 🐱 with a 👩‍👩‍👧 family, 🇯🇵 flag ✨✨ and 👍🏽",
    "一只可爱的猫 かわいい猫 귀여운 고양이 東京タワー",
    "Кошка на крыше, Ελληνικά, İstanbul, العربية, हिन्दी",
    GREEK_FINAL_SIGMA,
    "zero\u200bwidth and\u0000null and tab\x0bvt and soft\u00adhyphen",
    "tom &amp; jerry &lt;3",  # no html unescape (transformers never does)
    "a <|endoftext|> b <|startoftext|>c",  # special tokens in text stay special
    UPPER_CASE_LOOKALIKE,
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    LONG_PROMPT,
    LONG_PROMPT + " " + LONG_PROMPT,
    "a highly detailed " * 40,
]


def _bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _openai_vocab_and_merges():
    """openai/CLIP simple_tokenizer.py's construction, verbatim in substance."""
    merges = gzip.open(BUNDLED_VOCAB).read().decode("utf-8").split("\n")
    merges = [tuple(merge.split()) for merge in merges[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(merge) for merge in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return dict(zip(vocab, range(len(vocab)))), merges


class OpenAIBPE:
    """openai/CLIP's SimpleTokenizer.encode, without ftfy/html (neither is applied by
    transformers): NFC, whitespace collapse, lowercase, regex split, greedy-rank BPE."""

    def __init__(self):
        self.encoder, merges = _openai_vocab_and_merges()
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.byte_encoder = _bytes_to_unicode()
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text):
        text = " ".join(unicodedata.normalize("NFC", text).split()).strip().lower()
        ids = []
        for piece in regex.findall(self.pat, text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[piece])
                continue
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids


def _reference_ids(reference, prompts, max_length=77):
    return np.asarray(reference(prompts, padding="max_length", max_length=max_length,
                                truncation=True).input_ids, dtype=np.int64)


@pytest.fixture(scope="module")
def tokenizers_by_pad():
    return {pad: CLIPTokenizer.bundled(pad_token=pad) for pad in PAD_TOKENS}


@pytest.fixture(scope="module")
def saved_folders(tokenizers_by_pad, tmp_path_factory):
    folders = {}
    for pad, tok in tokenizers_by_pad.items():
        folders[pad] = tmp_path_factory.mktemp("tokenizer")
        tok.save_pretrained(folders[pad])
    return folders


def _encode_quietly(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(prompts)


@pytest.mark.parametrize("pad, pad_id", [("<|endoftext|>", EOS), ("!", 0)])
def test_known_ids_and_padding(pad, pad_id):
    tok = CLIPTokenizer.bundled(pad_token=pad)
    ids = tok("a cute cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :5].tolist() == [BOS, 320, 2242, 2368, EOS]
    assert (ids[0, 5:] == pad_id).all() and tok.pad_token_id == pad_id
    assert tok.vocab_size == 49408
    assert tok(["a cute cat", "a"]).shape == (2, 77)
    assert tok.decode(ids[0]) == "a cute cat"
    assert tok.decode(tok(["Hello,  World!", "x"])) == ["hello , world !", "x"]


def test_unsupported_pad_token_is_refused():
    with pytest.raises(ValueError, match="pad_token"):
        CLIPTokenizer.bundled(pad_token="<pad>")


@pytest.mark.parametrize("pad", PAD_TOKENS)
def test_equals_transformers_from_saved_folder(pad, tokenizers_by_pad, saved_folders):
    reference = transformers.CLIPTokenizer.from_pretrained(saved_folders[pad])
    assert reference.pad_token == pad and reference.model_max_length == 77
    np.testing.assert_array_equal(_encode_quietly(tokenizers_by_pad[pad], PROMPTS),
                                  _reference_ids(reference, PROMPTS))
    auto = transformers.AutoTokenizer.from_pretrained(saved_folders[pad])
    np.testing.assert_array_equal(_reference_ids(auto, PROMPTS), _reference_ids(reference, PROMPTS))


@pytest.mark.parametrize("pad", PAD_TOKENS)
def test_equals_transformers_from_openai_vocab(pad, tokenizers_by_pad):
    vocab, merges = _openai_vocab_and_merges()
    # CLIPTokenizerFast is an alias of CLIPTokenizer in transformers 5; both are checked when distinct.
    classes = dict.fromkeys([transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", None)])
    ours = _encode_quietly(tokenizers_by_pad[pad], PROMPTS)
    for cls in filter(None, classes):
        reference = cls(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)
        np.testing.assert_array_equal(ours, _reference_ids(reference, PROMPTS), err_msg=cls.__name__)


def test_equals_openai_bpe_algorithm(tokenizers_by_pad):
    """The tokens between BOS and EOS, before truncation, against openai/CLIP's own BPE loop.
    Left out: "!" padding (a special token there), the final sigma (lowercased differently)
    and the upper-case special-token lookalike (openai/CLIP maps it to EOS, transformers and
    we byte-pair encode it)."""
    reference = OpenAIBPE()
    prompts = [p for p in PROMPTS if p not in (GREEK_FINAL_SIGMA, UPPER_CASE_LOOKALIKE)]
    tok = CLIPTokenizer.bundled(pad_token="<|endoftext|>", max_length=512)
    for prompt, ids in zip(prompts, tok(prompts)):
        expected = reference.encode(prompt)
        assert ids[:len(expected) + 2].tolist() == [BOS, *expected, EOS], prompt


def test_truncation_keeps_eos_and_warns_dropped_count(tokenizers_by_pad):
    tok = tokenizers_by_pad["<|endoftext|>"]
    full = CLIPTokenizer.bundled(max_length=512)(["a cute cat", LONG_PROMPT])[1]
    n_tokens = int(np.argmax(full == EOS)) - 1
    assert n_tokens > 75
    expected_message = rf"prompt 1 is {n_tokens} tokens.*dropped the last {n_tokens - 75} tokens"
    with pytest.warns(UserWarning, match=expected_message):
        ids = tok(["a cute cat", LONG_PROMPT])
    np.testing.assert_array_equal(ids[1, :76], full[:76])
    assert ids[1, 76] == EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits exactly warns nothing
        assert tok(tok.decode(full[:76]))[0, 76] == EOS


@pytest.mark.parametrize("pad", PAD_TOKENS)
def test_save_and_load_round_trip(pad, tokenizers_by_pad, saved_folders):
    assert sorted(p.name for p in saved_folders[pad].iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    loaded = CLIPTokenizer.from_pretrained(saved_folders[pad])
    assert (loaded.pad_token, loaded.max_length, loaded.vocab_size) == (pad, 77, 49408)
    np.testing.assert_array_equal(_encode_quietly(loaded, PROMPTS),
                                  _encode_quietly(tokenizers_by_pad[pad], PROMPTS))


def test_from_pretrained_reads_folders_as_transformers_does(saved_folders, tmp_path):
    """An SD 2.x folder (pad "!" in special_tokens_map.json, "<|endoftext|>" in
    tokenizer_config.json) and a transformers 5 folder (tokenizer.json only)."""
    sd2 = tmp_path / "sd2"
    sd2.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (sd2 / name).write_bytes((saved_folders["!"] / name).read_bytes())
    config = json.loads((saved_folders["<|endoftext|>"] / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False,
                           "normalized": True, "rstrip": False, "single_word": False}
    (sd2 / "tokenizer_config.json").write_text(json.dumps(config))
    reference = transformers.CLIPTokenizer.from_pretrained(sd2)
    ours = CLIPTokenizer.from_pretrained(sd2)
    assert ours.pad_token == reference.pad_token == "!"

    v5 = tmp_path / "v5"
    reference.save_pretrained(v5)
    assert not (v5 / "vocab.json").exists() and (v5 / "tokenizer.json").exists()
    loaded = CLIPTokenizer.from_pretrained(v5)
    assert (loaded.pad_token, loaded.max_length) == ("!", 77)
    np.testing.assert_array_equal(_encode_quietly(loaded, PROMPTS), _reference_ids(reference, PROMPTS))

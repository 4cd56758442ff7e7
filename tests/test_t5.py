"""T5EncoderModel against transformers' PyTorch model on the same random weights, and
T5Tokenizer against transformers' T5 tokenizer on tiny vocabularies made here (no T5
vocabulary is bundled or downloaded).

Error measure: max|ours - reference| / max(1, max|reference|), float32 unless stated.
"""

import copy
import io
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers, trainers
from transformers.models.t5.modeling_t5 import T5Attention as ReferenceT5Attention

from diffusion_jax import models
from diffusion_jax.configs import t5 as t5_configs
from diffusion_jax.convert.torch_params import params_to_state_dict, state_dict_to_params
from diffusion_jax.models import t5
from diffusion_jax.tokenizer import T5Tokenizer

TOL = 1e-5
COMPONENT = models.KINDS["t5"]
# 8 buckets of at most 16 positions: a 40-token sequence reaches the logarithmic and the last
# bucket in both directions.
TINY = t5.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
SEQ_LEN = 40


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def reference_model(config: t5.T5Config) -> transformers.T5EncoderModel:
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(
        transformers.T5Config(**config.to_dict(), dropout_rate=0.0)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:  # RMS norm weights (init 1)
                p.add_(0.2 * torch.randn_like(p))
            elif p.shape == (config.relative_attention_num_buckets, config.num_heads):
                p.normal_(0.0, 1.0)  # position biases large enough to matter
    return ref


def converted_params(ref: transformers.T5EncoderModel, config: t5.T5Config) -> dict:
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    return state_dict_to_params(state_dict, COMPONENT.param_shapes(config),
                                prefix=COMPONENT.torch_prefix, ignore=COMPONENT.torch_ignore,
                                source="transformers T5EncoderModel")


def token_batch() -> tuple[np.ndarray, np.ndarray]:
    """Tokenizer-like rows (tokens, EOS id 1, padding id 0) of 5, 25 and all 40 positions."""
    rng = np.random.default_rng(0)
    ids = np.zeros((3, SEQ_LEN), np.int32)
    mask = np.zeros((3, SEQ_LEN), np.int32)
    for row, length in enumerate([5, 25, SEQ_LEN - 1]):
        ids[row, :length] = rng.integers(3, TINY.vocab_size, length)
        ids[row, length] = 1
        mask[row, :length + 1] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny():
    ref = reference_model(TINY)
    return ref, converted_params(ref, TINY)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16), (32, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    length = 600  # past max_distance both ways; T5-XXL's boundaries at distances 16, 32, 64
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = ReferenceT5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    ours = t5.relative_position_buckets(length, length, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, expected.numpy())


def test_matches_transformers(tiny):
    ref, params = tiny
    ids, mask = token_batch()
    with torch.no_grad():
        expected_masked = ref(torch.from_numpy(ids).long(),
                              attention_mask=torch.from_numpy(mask)).last_hidden_state
        expected_unmasked = ref(torch.from_numpy(ids).long()).last_hidden_state
    model = COMPONENT.build(TINY)
    masked = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask)
    unmasked = jax.jit(lambda p, i: COMPONENT.encode_text(model, p, i))(params, ids)
    assert set(unmasked) == set(TINY.output_widths)
    errors = {"masked": rel_err(masked, expected_masked),
              "unmasked (encode_text)": rel_err(unmasked["last_hidden_state"], expected_unmasked)}
    print(errors)
    assert max(errors.values()) <= TOL, errors
    # The mask matters (else the test would not test it) on the rows with padding only.
    assert rel_err(masked[:2, :5], unmasked["last_hidden_state"][:2, :5]) > 1e-2
    np.testing.assert_allclose(masked[2], unmasked["last_hidden_state"][2], atol=1e-6)


def test_bf16_close_to_fp32(tiny):
    """Our bfloat16 compute against the float32 reference, beside transformers' own bfloat16
    model against it."""
    ref, params = tiny
    ids, mask = token_batch()
    torch_ids, torch_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask)
    with torch.no_grad():
        fp32 = ref(torch_ids, attention_mask=torch_mask).last_hidden_state
        torch_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(
            torch_ids, attention_mask=torch_mask).last_hidden_state
    model = t5.T5EncoderModel(TINY, jnp.bfloat16)
    ours = jax.jit(lambda p: model.apply({"params": p}, ids, mask))(params)
    assert ours.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(ours)))
    err, torch_err = rel_err(ours, fp32), rel_err(torch_bf16.float(), fp32)
    print("bf16 error vs fp32: ours", err, "transformers", torch_err)
    assert 0 < err <= max(5e-2, 2 * torch_err)


def test_float16_is_refused(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match="float16"):
        t5.T5EncoderModel(TINY, jnp.float16).apply({"params": params}, token_batch()[0])


def test_state_dict_round_trip(tiny):
    """Export gives back the reference's keys; the tied `encoder.embed_tokens.weight` is the
    one tensor `shared.weight`."""
    ref, params = tiny
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    np.testing.assert_array_equal(state_dict["shared.weight"],
                                  state_dict["encoder.embed_tokens.weight"])
    exported = params_to_state_dict(params, prefix=COMPONENT.torch_prefix)
    assert set(exported) == set(state_dict) - {"encoder.embed_tokens.weight"}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    # A file saved without the tied copy (transformers' safetensors) converts the same.
    without_copy = {k: v for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"}
    jax.tree.map(np.testing.assert_array_equal, converted_params(ref, TINY),
                 state_dict_to_params(without_copy, COMPONENT.param_shapes(TINY)))


# FLUX.1-dev text_encoder_2/config.json and SD3's text_encoder_3/config.json (google/t5-v1_1-xxl's
# encoder), their architecture and bookkeeping keys.
T5_XXL_CONFIG_JSON = {
    "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
    "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
    "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True,
    "vocab_size": 32128,
}


def test_t5_xxl_param_count():
    config = COMPONENT.config_from_dict(t5_configs.t5_xxl())
    assert config == t5.T5Config.from_dict(T5_XXL_CONFIG_JSON)
    count = models.count_params(COMPONENT.param_shapes(config))
    print(f"T5-XXL encoder: {count:,} parameters")
    assert count == 4_762_310_656  # shared embedding counted once
    assert config.output_widths == {"last_hidden_state": 4096}


def test_from_dict_reads_transformers_configs():
    config = t5.T5Config.from_dict(transformers.T5Config(**TINY.to_dict()).to_dict())
    assert config == TINY == t5.T5Config.from_dict(TINY.to_dict())


@pytest.mark.parametrize("key, value, supported", [
    ("feed_forward_proj", "relu", "['gated-gelu']"),
    ("model_type", "mt5", "['t5']"),
])
def test_from_dict_rejects_unsupported_values(key, value, supported):
    with pytest.raises(ValueError) as excinfo:
        t5.T5Config.from_dict(dict(T5_XXL_CONFIG_JSON, **{key: value}))
    message = str(excinfo.value)
    assert key in message and supported in message, message


# --- T5Tokenizer -------------------------------------------------------------------------------

CORPUS = [
    "a photo of a cat sitting on the mat", "a lighthouse at dusk, oil painting",
    "the quick brown fox jumps over the lazy dog", "studio photo of a corgi, 85mm lens",
    "an astronaut riding a horse on mars, highly detailed", "a bowl of ramen, steam, close-up",
] * 10
LONG_PROMPT = "a highly detailed photo of a lighthouse at dusk " * 6
PROMPTS = [
    "a photo of a cat", "", "   A  photo\tof a\n\nDOG  ", "ramen, 85mm, astronaut!",
    "zebra xylophone q", "a cat <extra_id_0> on a mat </s> end",
    "a\u3000cat \uff46\uff55\uff4c\uff4c \ufb01 cafe\u0301",  # NFKC: ideographic space, full width, ligature
    LONG_PROMPT,
]
MAX_LENGTH = 24


def unigram_vocab() -> list[tuple[str, float]]:
    """A Unigram model trained here with the `tokenizers` library, T5's special tokens first."""
    tokenizer = Tokenizer(tokenizer_models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    return [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]


def reference_ids(reference, prompts, max_length=MAX_LENGTH):
    out = reference(prompts, padding="max_length", max_length=max_length, truncation=True)
    return np.array(out["input_ids"]), np.array(out["attention_mask"])


def check_against(reference, ours: T5Tokenizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = ours.encode(PROMPTS)
    long_row = PROMPTS.index(LONG_PROMPT)
    assert [str(w.message).split(" is ")[0] for w in caught] == [f"prompt {long_row}"]
    expected_ids, expected_mask = reference_ids(reference, PROMPTS)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(PROMPTS), MAX_LENGTH)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(ours(PROMPTS), ids)
        np.testing.assert_array_equal(ours("a photo of a cat")[0], ids[0])
    assert ours.pad_token_id == 0 and ids[1, 0] == ours.eos_token_id and not ids[1, 1:].any()
    assert ids[long_row, -1] == ours.eos_token_id and mask[long_row].all()  # truncated, EOS kept
    assert ours.decode(ids[0]) == reference.decode(expected_ids[0], skip_special_tokens=True)


def test_tokenizer_json_matches_transformers(tmp_path):
    reference = transformers.T5Tokenizer(vocab=unigram_vocab(), extra_ids=10)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and not (tmp_path / "spiece.model").exists()
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = T5Tokenizer.from_pretrained(tmp_path, max_length=MAX_LENGTH)
    assert ours.vocab_size == len(reloaded)
    check_against(reloaded, ours)
    # A sentinel written in a prompt is the special token, as transformers matches it.
    assert reloaded.convert_tokens_to_ids("<extra_id_0>") in ours("<extra_id_0>")[0]


def test_tokenizer_max_length_from_folder(tmp_path):
    transformers.T5Tokenizer(vocab=unigram_vocab(), extra_ids=0, model_max_length=24
                             ).save_pretrained(tmp_path)
    assert T5Tokenizer.from_pretrained(tmp_path).max_length == 24
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("model_max_length")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert T5Tokenizer.from_pretrained(tmp_path).max_length == 512


@pytest.fixture(scope="module")
def spiece_model() -> bytes:
    """A SentencePiece Unigram model trained here, with T5's ids (pad 0, EOS 1, unk 2) and
    SentencePiece's default NFKC normalization (a precompiled charsmap, as T5's has)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return model.getvalue()


def test_spiece_model_matches_transformers(tmp_path, spiece_model):
    """A folder with only spiece.model against the tokenizer transformers converts from it."""
    (tmp_path / "spiece.model").write_bytes(spiece_model)
    reference = transformers.T5Tokenizer.from_pretrained(tmp_path, extra_ids=0)
    ours = T5Tokenizer.from_pretrained(tmp_path, max_length=MAX_LENGTH)
    assert ours.vocab_size == 40
    prompts = [p for p in PROMPTS if "<extra_id" not in p]  # sentinels: transformers' additions
    expected_ids, expected_mask = reference_ids(reference, prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = ours.encode(prompts)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)


def test_transformers4_tokenizer_json_matches_transformers(tmp_path, spiece_model):
    """A tokenizer.json laid out as transformers 4's converter wrote T5's (Precompiled charsmap,
    right strip, runs of spaces replaced; a Metaspace pre-tokenizer), which transformers 5
    rebuilds in its own layout on loading and we run as written: the same ids."""
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spiece.model").write_bytes(spiece_model)
    transformers.T5Tokenizer.from_pretrained(tmp_path / "spm", extra_ids=5).save_pretrained(
        tmp_path / "t5")
    folder = tmp_path / "t5"
    (folder / "spiece.model").unlink(missing_ok=True)
    backend = json.loads((folder / "tokenizer.json").read_text())
    assert backend["normalizer"]["type"] == "Precompiled"
    backend["normalizer"] = {"type": "Sequence", "normalizers": [
        backend["normalizer"], {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]}
    backend["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                                "prepend_scheme": "always", "split": True}
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    check_against(transformers.AutoTokenizer.from_pretrained(folder),
                  T5Tokenizer.from_pretrained(folder, max_length=MAX_LENGTH))


def test_tokenizer_folder_without_vocabulary(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        T5Tokenizer.from_pretrained(tmp_path)

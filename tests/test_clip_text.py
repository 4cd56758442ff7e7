"""CLIPTextModel and CLIPTextModelWithProjection against transformers' PyTorch models on the
same random weights.

Error measure: max|ours - reference| / max(1, max|reference|), float32 unless stated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffusion_jax.configs import sd15, sd21, tiny
from diffusion_jax import models
from diffusion_jax.convert.torch_params import params_to_state_dict, state_dict_to_params
from diffusion_jax.models import clip_text

TOL = 1e-4
BOS, EOS = 49406, 49407
SEQ_LEN = 77


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def token_batch() -> np.ndarray:
    """Prompts as the SD tokenizers make them, plus one without EOS, where the legacy
    (argmax) and the modern (first EOS) pooling rules disagree."""
    rng = np.random.default_rng(0)
    ids = np.zeros((4, SEQ_LEN), np.int32)
    for row, (length, pad) in enumerate([(5, EOS), (30, 0), (SEQ_LEN - 2, EOS)]):
        ids[row, 0] = BOS
        ids[row, 1:length + 1] = rng.integers(1, BOS, length)
        ids[row, length + 1:] = pad  # SD 1.x pads with EOS, SD 2.x (OpenCLIP) with 0
        ids[row, length + 1] = EOS
    ids[3] = rng.integers(1, BOS, SEQ_LEN)  # truncated text, no EOS
    return ids


def tiny_config(hidden_act: str, eos_token_id: int) -> clip_text.CLIPTextConfig:
    d = dict(tiny.get_config().text_encoder, hidden_act=hidden_act, eos_token_id=eos_token_id)
    return clip_text.CLIPTextConfig.from_dict(d)


def reference_model(config: clip_text.CLIPTextConfig) -> transformers.CLIPTextModel:
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict())).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:  # LayerNorm scales (init 1) and biases (init 0)
                p.add_(0.2 * torch.randn_like(p))
    return ref


def converted_params(ref, config):
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    template = jax.eval_shape(clip_text.init_params, config, jax.random.key(0))
    # transformers 5 keeps CLIPTextModel's keys unprefixed in memory and in its own saves.
    return state_dict_to_params(state_dict, template, source="transformers CLIPTextModel")


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [clip_text.LEGACY_EOS_TOKEN_ID, EOS])
def test_matches_transformers(hidden_act, eos_token_id):
    config = tiny_config(hidden_act, eos_token_id)
    ref = reference_model(config)
    params = converted_params(ref, config)
    ids = token_batch()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
        penultimate = ref.final_layer_norm(expected.hidden_states[-2])

    model = clip_text.CLIPTextModel(config)
    out = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(params, ids)
    normed_penultimate = jax.jit(lambda p, ids: model.apply(
        {"params": p}, ids, -2, method=model.layer_output_with_final_norm))(params, ids)

    assert len(out.hidden_states) == config.num_hidden_layers + 1 == len(expected.hidden_states)
    errors = {
        "last_hidden_state": rel_err(out.last_hidden_state, expected.last_hidden_state),
        "pooler_output": rel_err(out.pooler_output, expected.pooler_output),
        "penultimate_with_final_norm": rel_err(normed_penultimate, penultimate),
        "hidden_states": max(rel_err(a, b) for a, b in zip(out.hidden_states,
                                                            expected.hidden_states)),
    }
    print(hidden_act, eos_token_id, errors)
    assert max(errors.values()) <= TOL, errors

    # The pooled rows are the expected positions: row 3 (no EOS) tells the two rules apart.
    last = np.asarray(out.last_hidden_state)
    no_eos_position = int(np.argmax(ids[3])) if eos_token_id == 2 else 0
    for row, position in enumerate([6, 31, SEQ_LEN - 1, no_eos_position]):
        np.testing.assert_array_equal(out.pooler_output[row], last[row, position])


def test_layer_output_with_final_norm_indexing():
    config = tiny_config("quick_gelu", 2)
    model = clip_text.CLIPTextModel(config)
    params = converted_params(reference_model(config), config)
    ids = token_batch()[:1]
    out = jax.jit(model.apply)({"params": params}, ids)
    layer_output = jax.jit(
        lambda layer: model.apply({"params": params}, ids, layer,
                                  method=model.layer_output_with_final_norm),
        static_argnums=0)
    apply_layer = lambda layer: layer_output(layer)
    np.testing.assert_allclose(apply_layer(-1), out.last_hidden_state, atol=1e-6)
    np.testing.assert_allclose(apply_layer(1), apply_layer(-config.num_hidden_layers))
    for bad in (config.num_hidden_layers + 1, -config.num_hidden_layers - 2):
        with pytest.raises(ValueError, match="out of range"):
            apply_layer(bad)


def test_loads_prefixed_state_dict_with_position_ids():
    """Released SD text encoders (saved by transformers 4) prefix `text_model.` and may carry
    the `position_ids` buffer."""
    config = tiny_config("gelu", EOS)
    ref = reference_model(config)
    plain = {k: v.numpy() for k, v in ref.state_dict().items()}
    prefixed = {"text_model." + k: v for k, v in plain.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(SEQ_LEN)[None]
    template = jax.eval_shape(clip_text.init_params, config, jax.random.key(0))
    params = state_dict_to_params(prefixed, template, prefix="text_model.",
                                  ignore=[r"position_ids$"])
    expected = converted_params(ref, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_bf16_close_to_fp32():
    config = tiny_config("quick_gelu", 2)
    params = converted_params(reference_model(config), config)
    ids = token_batch()
    run = lambda dtype: jax.jit(lambda p, ids: clip_text.CLIPTextModel(config, dtype).apply(
        {"params": p}, ids))(params, ids)
    fp32, bf16 = run(jnp.float32), run(jnp.bfloat16)
    assert bf16.last_hidden_state.dtype == jnp.float32  # outputs are float32 whatever the dtype
    err = rel_err(bf16.last_hidden_state, fp32.last_hidden_state)
    print("bf16 last_hidden_state error vs fp32", err)
    assert 0 < err <= 5e-2


def param_count(config) -> int:
    shapes = jax.eval_shape(clip_text.init_params, config, jax.random.key(0))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


def test_param_counts():
    assert param_count(clip_text.CLIPTextConfig.from_dict(sd15.get_config().text_encoder)) \
        == 123_060_480
    # OpenCLIP ViT-H/14 text tower less its last block, as diffusers stores SD 2.x's.
    assert param_count(clip_text.CLIPTextConfig.from_dict(sd21.get_config().text_encoder)) \
        == 340_387_840


# text_encoder/config.json of the released SD 1.5 and SD 2.1 (transformers 4.2x).
SD15_CONFIG_JSON = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_CONFIG_JSON = dict(
    SD15_CONFIG_JSON, _name_or_path="hf-models/stable-diffusion-v2-768x768/text_encoder",
    hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
    num_hidden_layers=23, projection_dim=512, transformers_version="4.25.0.dev0")


def test_from_dict_accepts_released_and_transformers5_configs():
    sd15_config = clip_text.CLIPTextConfig.from_dict(SD15_CONFIG_JSON)
    assert sd15_config == clip_text.CLIPTextConfig.from_dict(sd15.get_config().text_encoder)
    sd21_config = clip_text.CLIPTextConfig.from_dict(SD21_CONFIG_JSON)
    assert (sd21_config.num_hidden_layers, sd21_config.hidden_act) == (23, "gelu")
    # transformers 5 writes its own metadata, and a CLIPConfig nests the tower in text_config.
    text_config = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4)
    flat = clip_text.CLIPTextConfig.from_dict(text_config.to_dict())
    nested = clip_text.CLIPTextConfig.from_dict(
        transformers.CLIPConfig(text_config=text_config.to_dict()).to_dict())
    assert flat == nested and flat.hidden_size == 32 and flat.eos_token_id == EOS
    assert clip_text.CLIPTextConfig.from_dict(flat.to_dict()) == flat


@pytest.mark.parametrize("key, value, supported", [
    ("hidden_act", "relu", "['gelu', 'quick_gelu']"),
    ("eos_token_id", [2, 49407], "a single int"),
    ("dropout", 0.1, "0.0"),
    ("attention_dropout", 0.1, "0.0"),
    ("model_type", "clip_vision_model", "clip_text_model"),
])
def test_from_dict_rejects_unsupported_values(key, value, supported):
    with pytest.raises(ValueError) as excinfo:
        clip_text.CLIPTextConfig.from_dict(dict(SD15_CONFIG_JSON, **{key: value}))
    message = str(excinfo.value)
    assert key in message and supported in message, message


# --- CLIPTextModelWithProjection (SDXL's text_encoder_2, OpenCLIP ViT-bigG/14) ---------------

PROJECTION = models.KINDS["clip_text_projection"]


def tiny_projection_config(eos_token_id: int) -> clip_text.CLIPTextWithProjectionConfig:
    # projection_dim != hidden_size, so a transposed projection cannot pass.
    d = dict(tiny.get_config().text_encoder, hidden_act="gelu", eos_token_id=eos_token_id,
             projection_dim=24)
    return PROJECTION.config_from_dict(d)


def reference_projection_model(config) -> transformers.CLIPTextModelWithProjection:
    torch.manual_seed(0)
    ref = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**config.to_dict())).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ref


def converted_projection_params(state_dict, config):
    """By the kind's own conversion rule, as convert/diffusers.py applies it."""
    return state_dict_to_params(state_dict, PROJECTION.param_shapes(config),
                                prefix=PROJECTION.torch_prefix, ignore=PROJECTION.torch_ignore,
                                source="transformers CLIPTextModelWithProjection")


@pytest.mark.parametrize("eos_token_id", [clip_text.LEGACY_EOS_TOKEN_ID, EOS])
def test_with_projection_matches_transformers(eos_token_id):
    config = tiny_projection_config(eos_token_id)
    assert isinstance(config, clip_text.CLIPTextWithProjectionConfig)
    ref = reference_projection_model(config)
    state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert "text_projection.weight" in state_dict
    params = converted_projection_params(state_dict, config)
    assert set(params) == {"text_model", "text_projection"}
    ids = token_batch()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), output_hidden_states=True)

    model = PROJECTION.build(config)
    assert isinstance(model, clip_text.CLIPTextModelWithProjection)
    outputs = jax.jit(lambda p, ids: PROJECTION.encode_text(model, p, ids))(params, ids)
    assert set(outputs) == set(config.output_widths)
    for name, array in outputs.items():
        assert array.dtype == jnp.float32 and array.shape[-1] == config.output_widths[name]
    errors = {
        "last_hidden_state": rel_err(outputs["last_hidden_state"], expected.last_hidden_state),
        "penultimate_hidden_state": rel_err(outputs["penultimate_hidden_state"],
                                            expected.hidden_states[-2]),
        "text_embeds": rel_err(outputs["text_embeds"], expected.text_embeds),
    }
    print(eos_token_id, errors)
    assert max(errors.values()) <= TOL, errors
    # pooler_output is what was projected.
    np.testing.assert_allclose(
        outputs["text_embeds"],
        outputs["pooler_output"] @ np.asarray(params["text_projection"]["kernel"]),
        rtol=1e-5, atol=1e-6)


def test_with_projection_state_dict_round_trip():
    """transformers 4 saves (SDXL's text_encoder_2) carry `position_ids`; export gives back
    exactly the reference's keys."""
    config = tiny_projection_config(clip_text.LEGACY_EOS_TOKEN_ID)
    state_dict = {k: v.numpy() for k, v in reference_projection_model(config).state_dict().items()}
    with_buffer = dict(state_dict)
    with_buffer["text_model.embeddings.position_ids"] = np.arange(SEQ_LEN)[None]
    params = converted_projection_params(with_buffer, config)
    exported = params_to_state_dict(params, prefix=PROJECTION.torch_prefix)
    assert set(exported) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_plain_model_gives_penultimate_hidden_state():
    config = tiny_config("quick_gelu", EOS)
    ref = reference_model(config)
    params = converted_params(ref, config)
    ids = token_batch()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    component = models.KINDS["clip_text"]
    outputs = component.encode_text(component.build(config), params, ids)
    assert set(outputs) == set(config.output_widths) == {
        "last_hidden_state", "penultimate_hidden_state", "pooler_output"}
    assert rel_err(outputs["penultimate_hidden_state"], expected.hidden_states[-2]) <= TOL


# SDXL's text_encoder_2/config.json (architecture keys).
SDXL_TEXT_ENCODER_2_CONFIG_JSON = dict(
    SD15_CONFIG_JSON, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    projection_dim=1280, transformers_version="4.32.0.dev0")


def test_bigG_param_count():
    config = PROJECTION.config_from_dict(SDXL_TEXT_ENCODER_2_CONFIG_JSON)
    assert (config.vocab_size, config.max_position_embeddings, config.layer_norm_eps,
            config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (49408, 77, 1e-5, 0, 2, 1)
    assert models.count_params(PROJECTION.param_shapes(config)) == 694_659_840
    assert config.output_widths == {"last_hidden_state": 1280, "penultimate_hidden_state": 1280,
                                    "pooler_output": 1280, "text_embeds": 1280}

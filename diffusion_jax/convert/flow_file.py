"""Single-file Flux.1 and SD3 / SD3.5 checkpoints, in the layouts their makers publish.

Flux.1 (Black Forest Labs' flux1-dev.safetensors, flux1-schnell, the fine-tunes shared in it):

    img_in, txt_in, time_in / vector_in / guidance_in .in_layer / .out_layer
    double_blocks.N.{img,txt}_mod.lin          modulation of the image and text streams
    double_blocks.N.{img,txt}_attn.qkv         q, k and v stacked on the output axis
    double_blocks.N.{img,txt}_attn.norm.{query,key}_norm.scale, .{img,txt}_attn.proj,
    double_blocks.N.{img,txt}_mlp.0 / .2
    single_blocks.N.linear1                    q, k, v and the MLP's input stacked
    single_blocks.N.linear2, .modulation.lin, .norm.{query,key}_norm.scale
    final_layer.linear, final_layer.adaLN_modulation.1   (shift before scale)

SD3 / SD3.5 (Stability's sd3_medium*.safetensors, sd3.5_large.safetensors, ...):

    x_embedder.proj, pos_embed (a buffer), t_embedder.mlp.0 / .2, y_embedder.mlp.0 / .2,
    context_embedder
    joint_blocks.N.{x,context}_block.attn.qkv (stacked), .attn.proj, .attn.ln_q / .ln_k (SD3.5),
    joint_blocks.N.{x,context}_block.adaLN_modulation.1, .mlp.fc1 / .fc2
    joint_blocks.N.x_block.attn2.*             SD3.5 Medium's second self-attention
    final_layer.linear, final_layer.adaLN_modulation.1   (shift before scale, as the last
                                               block's context modulation)

The transformer's keys sit under `model.diffusion_model.` in Stability's and ComfyUI's
all-in-one files, which may also hold the VAE (`first_stage_model.*`, LDM names) and text
towers (`text_encoders.clip_l.transformer.*`, `.clip_g.`, `.t5xxl.`: transformers' names).

No such file holds the tokenizers, and most hold the transformer alone, so a diffusers folder
of the same family (`base`) completes the system: the towers the file lacks, the tokenizers,
the scheduler and the towers' configs. The transformer's architecture is read from the
weights (depths, widths, heads, guidance embedder, channels, SD3's position grid, dual
attention and qk norm); what weights cannot say (Flux's RoPE axes, SD3's sample size) is the
base transformer's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax import system as system_lib
from diffusion_jax.convert import single_file
from diffusion_jax.convert.torch_params import (ConversionError, key_report, state_dict_to_params,
                                                torch_key)

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

Source = tuple[str, Callable[[np.ndarray], np.ndarray]]  # (file key, value transform)


def _identity(value: np.ndarray) -> np.ndarray:
    return value


def _rows(start: int, stop: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """One part of weights stacked on the output axis (a fused q/k/v projection)."""
    return lambda value: value[start:stop]


def _swap_halves(value: np.ndarray) -> np.ndarray:
    # The reference modulations put shift before scale; diffusers' AdaLayerNormContinuous
    # reads scale first. Swapping the halves is its own inverse.
    shift, scale = np.split(value, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def _outside_blocks(module: str, leaf: str, renamed: Mapping[str, str]) -> Source | None:
    """The source of a param outside the blocks: renamed whole, or the final layer's
    modulation with its halves swapped; None for a block's param."""
    if module in renamed:
        return f"{renamed[module]}.{leaf}", _identity
    if module == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}", _swap_halves
    return None


def _stacked(block: str, fused: str, part: int, leaf: str, inner: int) -> Source:
    """Part `part` of the fused q/k/v projection `fused` of a block."""
    return f"{block}.{fused}.{leaf}", _rows(part * inner, (part + 1) * inner)


# ----------------------------------------------------------------------------- Flux.1

_FLUX_FIXED = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_FLUX_DOUBLE_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1),
                    "attn.to_v": ("img_attn.qkv", 2), "attn.add_q_proj": ("txt_attn.qkv", 0),
                    "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2)}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm", "proj_out": "linear2"}
_FLUX_LINEAR1 = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}  # in that order


def flux_source(key: str, config) -> Source:
    """The BFL key (and transform) of a diffusers FluxTransformer2DModel state-dict key."""
    module, _, leaf = key.rpartition(".")
    # BFL's RMS norms call their weight `scale`.
    file_leaf = lambda name: "scale" if name.endswith("_norm") else leaf
    inner = config.inner_dim
    if outside := _outside_blocks(module, leaf, _FLUX_FIXED):
        return outside
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        block = f"double_blocks.{m[1]}"
        if m[2] in _FLUX_DOUBLE_QKV:
            return _stacked(block, *_FLUX_DOUBLE_QKV[m[2]], leaf, inner)
        if m[2] in _FLUX_DOUBLE:
            name = _FLUX_DOUBLE[m[2]]
            return f"{block}.{name}.{file_leaf(name)}", _identity
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
        block = f"single_blocks.{m[1]}"
        if m[2] in _FLUX_LINEAR1:
            part = _FLUX_LINEAR1[m[2]]
            return f"{block}.linear1.{leaf}", _rows(part * inner, (part + 1) * inner
                                                    if part < 3 else None)
        if m[2] in _FLUX_SINGLE:
            name = _FLUX_SINGLE[m[2]]
            return f"{block}.{name}.{file_leaf(name)}", _identity
    raise ConversionError(f"no Flux.1 file name for transformer parameter {key}")


def infer_flux(sd: Mapping[str, Any], path: Path) -> dict:
    """The FluxTransformer2DModel config fields the shapes determine."""
    shape = lambda key: _shape(sd, key, path, "Flux.1")
    inner, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    out_channels = shape("final_layer.linear.weight")[0]
    return {
        "num_layers": len(single_file._indices(sd, "double_blocks.")),
        "num_single_layers": len(single_file._indices(sd, "single_blocks.")),
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,  # dev has it, schnell not
    }


# ----------------------------------------------------------------------------- SD3 / SD3.5

_SD3_FIXED = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
}
_SD3_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
_SD3_QKV = {f"{attn}.to_{x}": (f"x_block.{attn}.qkv", i)
            for attn in ("attn", "attn2") for i, x in enumerate("qkv")}
_SD3_QKV.update({f"attn.add_{x}_proj": ("context_block.attn.qkv", i) for i, x in enumerate("qkv")})


def sd3_source(key: str, config) -> Source:
    """Stability's key (and transform) of a diffusers SD3Transformer2DModel state-dict key."""
    module, _, leaf = key.rpartition(".")
    if outside := _outside_blocks(module, leaf, _SD3_FIXED):
        return outside
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
        block = f"joint_blocks.{m[1]}"
        if m[2] in _SD3_QKV:
            return _stacked(block, *_SD3_QKV[m[2]], leaf, config.inner_dim)
        if m[2] in _SD3_BLOCK:
            # The last block's text stream ends in a final layer's norm (context_pre_only).
            last = m[2] == "norm1_context.linear" and int(m[1]) == config.num_layers - 1
            return f"{block}.{_SD3_BLOCK[m[2]]}.{leaf}", _swap_halves if last else _identity
    raise ConversionError(f"no SD3 file name for transformer parameter {key}")


def infer_sd3(sd: Mapping[str, Any], path: Path) -> dict:
    """The SD3Transformer2DModel config fields the shapes determine."""
    shape = lambda key: _shape(sd, key, path, "SD3")
    inner, in_channels, patch, _ = shape("x_embedder.proj.weight")
    blocks = single_file._indices(sd, "joint_blocks.")
    inferred = {
        "num_layers": len(blocks), "patch_size": patch, "in_channels": in_channels,
        "out_channels": shape("final_layer.linear.weight")[0] // patch ** 2,
        "joint_attention_dim": shape("context_embedder.weight")[1],
        "caption_projection_dim": shape("context_embedder.weight")[0],
        "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
        "dual_attention_layers": tuple(i for i in blocks
                                       if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd),
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in sd else None,
        "_width": inner,  # heads follow from the head width (read from qk norm, else the base's)
    }
    if "pos_embed" in sd:  # [1, side^2, width]
        inferred["pos_embed_max_size"] = math.isqrt(shape("pos_embed")[1])
    if inferred["qk_norm"]:
        inferred["attention_head_dim"] = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0]
    return inferred


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class FlowLayout:
    """One family's single-file layout."""

    name: str
    system: system_lib.System
    marker: str  # a key every file of the family has (without the transformer prefix)
    text_prefixes: Mapping[str, str]  # text tower -> prefix of its keys in all-in-one files
    infer: Callable[[Mapping[str, Any], Path], dict]
    source: Callable[[str, Any], Source]
    ignored: frozenset[str] = frozenset()  # transformer keys that are no params


_CLIP_L, _CLIP_G, _T5 = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                         "text_encoders.t5xxl.transformer.")
LAYOUTS = (
    FlowLayout("Flux.1", system_lib.FLUX, "double_blocks.0.img_attn.qkv.weight",
               {"text_encoder": _CLIP_L, "text_encoder_2": _T5}, infer_flux, flux_source),
    FlowLayout("SD3", system_lib.SD3, "joint_blocks.0.x_block.attn.qkv.weight",
               {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5},
               infer_sd3, sd3_source, ignored=frozenset({"pos_embed"})),
)
# Text-tower keys that are no params of our towers: buffers, and the CLIP heads that a
# tower without a projection (Flux's CLIP-L) leaves unused.
_TEXT_IGNORED = re.compile(r"(position_ids|logit_scale|text_projection\.weight)$")


def _shape(sd: Mapping[str, Any], key: str, path: Path, family: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"{path}: unknown architecture: key {key} is missing, which every "
                              f"{family} transformer has")
    return tuple(sd[key].shape)


def layout_of(state_dict: Mapping[str, Any]) -> FlowLayout | None:
    """The family of a Flux.1 / SD3 file, None for any other file."""
    for layout in LAYOUTS:
        if layout.marker in state_dict or TRANSFORMER_PREFIX + layout.marker in state_dict:
            return layout
    return None


def _transformer_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's keys without their prefix (a transformer-only file has none)."""
    if any(key.startswith(TRANSFORMER_PREFIX) for key in state_dict):
        return {key[len(TRANSFORMER_PREFIX):]: value for key, value in state_dict.items()
                if key.startswith(TRANSFORMER_PREFIX)}
    return dict(state_dict)


def _tower_prefixes(layout: FlowLayout, state_dict: Mapping[str, Any]) -> dict[str, str]:
    """Tower name -> the prefix of its keys, for the towers the file holds."""
    prefixes = {layout.system.denoiser.name: TRANSFORMER_PREFIX, layout.system.vae.name: VAE_PREFIX,
                **layout.text_prefixes}
    if not any(key.startswith(TRANSFORMER_PREFIX) for key in state_dict):
        return {layout.system.denoiser.name: ""}  # a transformer-only file
    return {name: prefix for name, prefix in prefixes.items()
            if any(key.startswith(prefix) for key in state_dict)}


def transformer_config(layout: FlowLayout, inferred: Mapping[str, Any],
                       section: Mapping[str, Any], given: Mapping[str, Any] | None, path: Path):
    """The base's transformer section (or the caller's, checked against the weights),
    completed by what the weights show."""
    component = layout.system.denoiser.component
    inferred = dict(inferred)
    width = inferred.pop("_width", None)
    if given is not None:
        for key, value in inferred.items():
            if key in given and _comparable(given[key]) != _comparable(value):
                raise ConversionError(f"{path}: the weights have transformer.{key}={value!r} "
                                      f"but the config says {given[key]!r}")
    merged = {**section, **(given or {}), **inferred}
    if width is not None and "num_attention_heads" not in inferred:
        merged["num_attention_heads"] = width // merged["attention_head_dim"]
    try:
        return component.config_from_dict(merged)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e} (what the weights cannot say comes from --base; "
                              "give the transformer section with --config)") from None


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _sources(name: str, layout: FlowLayout, config, prefix: str) -> dict[tuple, Source]:
    """Flax param path -> (file key, transform) for every param of the tower."""
    tower = layout.system.tower(name)
    component = tower.component
    sources = {}
    for path in traverse_util.flatten_dict(component.param_shapes(config)):
        key = torch_key(path)
        if tower is layout.system.denoiser:
            file_key, transform = layout.source(key, config)
        elif tower is layout.system.vae:
            file_key, transform = single_file.vae_ldm_source(key, config)
        else:
            file_key, transform = torch_key(path, component.torch_prefix), _identity
        sources[path] = prefix + file_key, transform
    return sources


def _ignored(key: str, layout: FlowLayout, prefixes: Mapping[str, str]) -> bool:
    """A key that is no param: a buffer of the tower whose prefix it has."""
    for name, prefix in prefixes.items():
        if not key.startswith(prefix):
            continue
        rest, tower = key[len(prefix):], layout.system.tower(name)
        if tower is layout.system.denoiser:
            return rest in layout.ignored
        patterns = tower.component.torch_ignore
        return (any(re.search(p, rest) for p in patterns)
                or (name in layout.text_prefixes and bool(_TEXT_IGNORED.search(rest))))
    return False


def _gather(state_dict: Mapping[str, np.ndarray], layout: FlowLayout,
            configs: Mapping[str, Any], prefixes: Mapping[str, str], path: Path) -> dict:
    """Each of the file's towers' params; one ConversionError listing every missing,
    unexpected and mis-shaped key, under the file's own names."""
    used, missing, mismatched, items = set(), set(), [], {}
    for name, prefix in prefixes.items():
        component = layout.system.tower(name).component
        items[name] = single_file.fetch(
            state_dict, _sources(name, layout, configs[name], prefix),
            component.param_shapes(configs[name]), component.torch_prefix, used, missing,
            mismatched, describe=lambda transform, shape: f"a part of shape {shape}")
    unexpected = sorted(key for key in state_dict
                        if key not in used and not _ignored(key, layout, prefixes))
    problems = key_report(missing, unexpected, mismatched)
    if problems:
        raise ConversionError(f"{path} does not match a {layout.name} model: {problems}")
    return {name: state_dict_to_params(
                converted, layout.system.tower(name).component.param_shapes(configs[name]),
                prefix=layout.system.tower(name).component.torch_prefix, source=str(path))
            for name, converted in items.items()}


def _read_base(layout: FlowLayout, base: str | None, from_file: set[str],
               path: Path) -> tuple[dict, dict]:
    from diffusion_jax.convert import diffusers

    if base is None:
        raise ConversionError(
            f"{path} is a {layout.name} single file, which holds no tokenizers (and often only "
            f"the transformer): give --base DIR, a diffusers {layout.name} folder, for the "
            "other towers, the tokenizers and the scheduler")
    folder = Path(base)
    if not folder.is_dir():
        raise FileNotFoundError(f"--base {base}: no such diffusers folder")
    found = diffusers.detect_system(folder)
    if found != layout.system:
        raise ConversionError(f"--base {base} is not a diffusers {layout.name} folder (its "
                              f"layout is that of another family); give one of {path}'s family")
    return diffusers.read_pipeline(folder, without_weights=from_file)


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any] | None,
                           path: Path, base: str | None = None) -> tuple[dict, dict]:
    """(params by item, checkpoint config) of a Flux.1 / SD3 single file, completed by the
    diffusers folder `base`. `config` may give the transformer and schedule sections."""
    layout = layout_of(state_dict)
    given = dict(config or {})
    extra = sorted(set(given) - {"transformer", "schedule"})
    if extra:
        raise ConversionError(f"--config for a {layout.name} single file gives the transformer "
                              f"and schedule sections only, not {extra}: the other towers' "
                              "configs are --base's")
    prefixes = _tower_prefixes(layout, state_dict)
    items, checkpoint_config = _read_base(layout, base, set(prefixes), path)
    denoiser = layout.system.denoiser.name
    transformer_sd = _transformer_keys(state_dict)
    configs = {name: layout.system.tower(name).component.config_from_dict(checkpoint_config[name])
               for name in prefixes}
    configs[denoiser] = transformer_config(layout, layout.infer(transformer_sd, path),
                                           checkpoint_config[denoiser], given.get(denoiser), path)
    items.update(_gather(state_dict, layout, configs, prefixes, path))
    checkpoint_config[denoiser] = configs[denoiser].to_dict()
    if "schedule" in given:
        checkpoint_config["schedule"] = dict(given["schedule"])
    return items, checkpoint_config

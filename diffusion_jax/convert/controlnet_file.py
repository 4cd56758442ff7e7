"""Single-file ControlNets in the original layout (lllyasviel's ControlNet repository,
`control_sd15_*.pth`, `control_v11*_sd15_*.pth` / `.safetensors`, thibaud's SD 2.1 ones):

    time_embed.0 / .2, label_emb.0.0 / .2   the U-Net's time (and SDXL's micro-conditioning) MLPs
    input_blocks.*, middle_block.*          the U-Net's encoder half, under its LDM names
    input_hint_block.0, 2, ..., 2k          the control image's conv net (SiLU between)
    zero_convs.i.0                          the zero conv on skip i
    middle_block_out.0                      the zero conv on the mid block

with a `control_model.` prefix in the v1.0 files (which also carry a copy of SD 1.5 itself,
`model.diffusion_model.*` and the rest: left out here, as diffusers' loader does; convert it
on its own). The encoder half's names are the U-Net's (`single_file.unet_ldm_key`); the
architecture is read from the shapes, and what they cannot say (head counts) is the family's
released model's: SD 1.x for 768-wide cross-attention, 64-channel heads otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax import system as system_lib
from diffusion_jax.convert.single_file import (HEAD_CHANNELS, _fill_depths, _identity, _indices,
                                               _shape, fetch, infer_encoder, unet_ldm_key)
from diffusion_jax.convert.torch_params import (ConversionError, key_report, state_dict_to_params,
                                                torch_key)
from diffusion_jax.models.controlnet import ControlNetConfig

CONTROL_PREFIX = "control_model."
HINT = "input_hint_block."
SD1_CONTEXT = 768  # CLIP ViT-L: SD 1.x's cross-attention width, 8 heads per level
SDXL_TIME_EMBED_DIM = 256


def prefix_of(state_dict: Mapping[str, Any]) -> str | None:
    """The ControlNet keys' prefix ("control_model." or ""), None for a file without them."""
    for prefix in (CONTROL_PREFIX, ""):
        if any(key.startswith(prefix + HINT) for key in state_dict):
            return prefix
    return None


def controlnet_ldm_key(key: str, config: ControlNetConfig) -> str:
    """Original name (without prefix) of a diffusers ControlNetModel state-dict key."""
    module, _, leaf = key.rpartition(".")
    blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    if module == "controlnet_cond_embedding.conv_in":
        return f"{HINT}0.{leaf}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"{HINT}{2 * (int(m[1]) + 1)}.{leaf}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"{HINT}{2 * (blocks + 1)}.{leaf}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{leaf}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{leaf}"
    return unet_ldm_key(key, config.unet)


def infer_config(sd: Mapping[str, Any], prefix: str, path: Path) -> dict:
    """The ControlNetModel config fields the shapes determine."""
    inferred = infer_encoder(sd, path, prefix)
    convs = _indices(sd, prefix + HINT)
    hint = lambda i: _shape(sd, f"{prefix}{HINT}{i}.weight", path)
    if len(convs) < 2 or len(convs) % 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise ConversionError(f"{path}: unknown architecture: {HINT}* convs at {convs}, not "
                              "0, 2, ..., 2k (conv_in, pairs of convs, conv_out)")
    inferred.update(
        conditioning_channels=hint(0)[1],
        conditioning_embedding_out_channels=[hint(0)[0]] + [hint(i)[0] for i in convs[2:-1:2]])
    return inferred


def _defaults(inferred: Mapping[str, Any]) -> dict:
    if inferred["cross_attention_dim"] == SD1_CONTEXT:
        return {"attention_head_dim": 8}
    defaults = {"attention_head_dim": [c // HEAD_CHANNELS for c in inferred["block_out_channels"]]}
    if inferred.get("addition_embed_type") == "text_time":
        defaults["addition_time_embed_dim"] = SDXL_TIME_EMBED_DIM
    return defaults


def config_from_weights(inferred: Mapping[str, Any], given: Mapping[str, Any] | None,
                        path: Path) -> ControlNetConfig:
    """The caller's controlnet section checked against the weights, or the defaults
    completed by what the weights show."""
    inferred = dict(inferred)
    seen_depths = inferred.pop("transformer_layers_per_block")
    if given is None:
        return ControlNetConfig.from_dict({
            **_defaults(inferred), **inferred,
            "transformer_layers_per_block": _fill_depths(seen_depths, 1)})
    config = ControlNetConfig.from_dict(given)
    for key, value in inferred.items():
        ours = getattr(config, key)
        if (tuple(ours) if isinstance(ours, (list, tuple)) else ours) != (
                tuple(value) if isinstance(value, list) else value):
            raise ConversionError(f"{path}: the weights have controlnet.{key}={value!r} but the "
                                  f"config says {ours!r}")
    if any(s not in (None, d) for s, d in zip(seen_depths, config.unet.depth_per_block)):
        raise ConversionError(f"{path}: the weights have {seen_depths} transformer blocks per "
                              "level but the config says transformer_layers_per_block="
                              f"{config.transformer_layers_per_block!r}")
    return config


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           config: Mapping[str, Any] | None, path: Path) -> tuple[dict, dict]:
    """(params by item, checkpoint config) of a `system.CONTROLNET` checkpoint."""
    prefix = prefix_of(state_dict)
    if prefix is None:
        raise ConversionError(f"{path}: not a ControlNet file (no {HINT}* keys)")
    given = dict(config or {})
    cfg = config_from_weights(infer_config(state_dict, prefix, path), given.get("controlnet"), path)
    (tower,) = system_lib.CONTROLNET.towers
    template = tower.component.param_shapes(cfg)
    sources = {path: (prefix + controlnet_ldm_key(torch_key(path), cfg), _identity)
               for path in traverse_util.flatten_dict(template)}
    used, missing, mismatched = set(), set(), []
    converted = fetch(state_dict, sources, template, "", used, missing, mismatched)
    # A v1.0 file's copy of SD itself sits outside the prefix.
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in used)
    problems = key_report(missing, unexpected, mismatched)
    if problems:
        raise ConversionError(f"{path} does not match a ControlNet: {problems}")
    params = state_dict_to_params(converted, template, source=str(path))
    return ({tower.name: params},
            {tower.name: cfg.to_dict(), system_lib.SYSTEM_SECTION: system_lib.CONTROLNET.to_dict()})

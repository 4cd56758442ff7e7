"""Single-file Stable Diffusion checkpoints: the CompVis LDM layout of SD 1.x / 2.x and the
Stability SGM layout of SDXL, as A1111 and ComfyUI use them.

One state dict holds the whole system:

    model.diffusion_model.*          U-Net (input_blocks / middle_block / output_blocks; SDXL's
                                     micro-conditioning MLP is label_emb.0.0 / label_emb.0.2)
    first_stage_model.*              VAE (encoder.down.i.block.j, mid.attn_1 as 1x1 convs, ...)
    cond_stage_model.transformer.*   SD 1.x text tower: a transformers CLIPTextModel
    cond_stage_model.model.*         SD 2.x text tower: OpenCLIP ViT-H (fused in_proj q/k/v)
    conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*
                                     SDXL base: CLIP ViT-L (transformers names), OpenCLIP bigG
    conditioner.embedders.0.model.*  SDXL refiner: OpenCLIP bigG alone
    model_ema.*                      EMA copy of the U-Net (dots removed from the names)
    betas, alphas_cumprod, ...       the training schedule, as buffers

Each diffusers param name maps to one file key (plus a slice, a squeeze or a transpose), so
the loader walks the params the config's models have and fetches each from the file: a
missing key, a key left over and a wrong shape are all reported with the file's own names.

The architecture comes from the weights: the family from the text towers, channels, depths,
transformer blocks per level, attention placement, 4 or 9 input channels, the
cross-attention width and SDXL's micro-conditioning width from shapes. What weights cannot
tell (head counts, prediction type, resolution, attention upcast, the VAE's scale) defaults
to the family's released model (SD 1.5; SD 2.1 768-v, as diffusers assumes; SDXL base or
refiner 1.0) unless the caller's config gives it. SD 2.x conditions on OpenCLIP's penultimate
layer, so its last block is dropped, as diffusers' 23-layer text encoder does; SDXL's bigG
tower keeps all its blocks (it reads the penultimate hidden state itself).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax.convert import read_weights_file
from diffusion_jax.convert.torch_params import (ConversionError, key_report, state_dict_to_params,
                                                torch_key)
from diffusion_jax import system as system_lib

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
EMA_PREFIX = "model_ema."

# LatentDiffusion's and SGM's (denoiser.sigmas) schedule buffers, which the config's schedule
# re-derives, and EMA counters.
IGNORED_KEYS = frozenset({
    "denoiser.sigmas", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates",
})


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Where a file keeps one text tower, and under which names."""

    tower: str  # the system's text tower it holds
    prefix: str  # of its keys in the file
    openclip: bool  # OpenCLIP names (fused q/k/v), else a transformers CLIPTextModel's
    drop_last: bool = False  # SD 2.x: the file's last block is beyond diffusers' tower

    @property
    def ignored(self) -> frozenset[str]:
        if not self.openclip:
            return frozenset({self.prefix + "text_model.embeddings.position_ids"})
        # OpenCLIP's contrastive head: SD 2.x conditions on hidden states only.
        head = ("logit_scale", "text_projection") if self.drop_last else ("logit_scale",)
        return frozenset(self.prefix + name for name in head)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One family's single-file layout: the system it converts to and its text towers."""

    system: system_lib.System
    text: tuple[TextLayout, ...]
    config_module: str  # configs/*.py of the released model: what the weights cannot say

    def text_layout(self, name: str) -> TextLayout:
        return next(t for t in self.text if t.tower == name)


LAYOUTS = {
    "SD 1.x": Layout(system_lib.STABLE_DIFFUSION,
                     (TextLayout("text_encoder", CLIP_PREFIX, openclip=False),), "sd15"),
    "SD 2.x": Layout(system_lib.STABLE_DIFFUSION,
                     (TextLayout("text_encoder", OPENCLIP_PREFIX, openclip=True,
                                 drop_last=True),), "sd21"),
    "SDXL base": Layout(system_lib.SDXL_BASE,
                        (TextLayout("text_encoder", SDXL_PREFIX + "0.transformer.",
                                    openclip=False),
                         TextLayout("text_encoder_2", SDXL_PREFIX + "1.model.", openclip=True)),
                        "sdxl_base"),
    "SDXL refiner": Layout(system_lib.SDXL_REFINER,
                           (TextLayout("text_encoder_2", SDXL_PREFIX + "0.model.",
                                       openclip=True),),
                           "sdxl_refiner"),
}

# What the weights cannot say, for SD 1.x / 2.x: the released SD 1.5 and SD 2.1 (768, v)
# models, as configs/sd15.py and configs/sd21.py describe them ...
_UNSEEN_BY_WEIGHTS = {"unet": ("sample_size", "upcast_attention"),
                      "vae": ("sample_size", "scaling_factor", "norm_num_groups"),
                      "text_encoder": ("hidden_act",), "tokenizer": ("pad_token",)}
# ... and the token ids the original text towers' config.json files give: OpenCLIP's
# tokenizer's own for SD 2.x's (the pooled output is taken at the same EOS either way).
_TEXT_TOKEN_IDS = {"SD 1.x": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
                   "SD 2.x": {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}}


def _family_sections(family: str) -> dict:
    config = importlib.import_module(
        f"diffusion_jax.configs.{LAYOUTS[family].config_module}").get_config()
    if family not in _TEXT_TOKEN_IDS:  # SDXL: its config file whole; the weights override
        return system_lib.checkpoint_config(config)
    sections = {name: {key: config[name][key] for key in keys}
                for name, keys in _UNSEEN_BY_WEIGHTS.items()}
    if family == "SD 1.x":  # the others' head counts follow from the widths (HEAD_CHANNELS)
        sections["unet"]["attention_head_dim"] = config.unet.attention_head_dim[0]
    sections["text_encoder"].update(_TEXT_TOKEN_IDS[family])
    sections["schedule"] = config.schedule.to_dict()
    return sections


FAMILY_DEFAULTS = {family: _family_sections(family) for family in LAYOUTS}
HEAD_CHANNELS = 64  # SD 2.x and SDXL U-Nets and all CLIP towers use 64-channel attention heads

Source = tuple[str, Callable[[np.ndarray], np.ndarray]]  # (LDM key, value transform)


def _identity(value: np.ndarray) -> np.ndarray:
    return value


def _conv_1x1_to_linear(value: np.ndarray) -> np.ndarray:
    # The LDM VAE's mid attention projects with 1x1 convs (O, I, 1, 1); diffusers with Linear.
    if value.ndim > 2 and all(size == 1 for size in value.shape[2:]):
        return value.reshape(value.shape[:2])
    return value


def _third(index: int, value: np.ndarray) -> np.ndarray:
    # OpenCLIP's fused in_proj stacks q, k, v along the output axis.
    size = value.shape[0] // 3
    return value[index * size:(index + 1) * size]


# ----------------------------------------------------------------------------- detection


def _indices(state_dict: Mapping[str, Any], prefix: str) -> list[int]:
    """The integers i of keys `prefix + "i." + ...`."""
    found = {int(m[1]) for key in state_dict
             if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return sorted(found)


def _shape(state_dict: Mapping[str, Any], key: str, path: Path) -> tuple[int, ...]:
    if key not in state_dict:
        raise ConversionError(f"{path}: unknown architecture: key {key} is missing, which every "
                              "Stable Diffusion checkpoint of its family has")
    return tuple(state_dict[key].shape)


def detect_family(state_dict: Mapping[str, Any], path: Path) -> str:
    """A LAYOUTS key ("SD 1.x", "SD 2.x", "SDXL base", "SDXL refiner"), from the text towers'
    keys; a clear error for anything else."""
    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in state_dict)

    unknown = (f"{path}: unknown architecture, not a Stable Diffusion 1.x / 2.x or SDXL "
               "single file")
    if not has(UNET_PREFIX):
        sample = ", ".join(sorted(state_dict)[:3])
        raise ConversionError(f"{unknown}: it has no U-Net weights ({UNET_PREFIX}*); its keys "
                              f"start {sample} ... (a diffusers folder converts with --from diffusers)")
    if not has(VAE_PREFIX):
        raise ConversionError(f"{unknown}: it has no VAE weights ({VAE_PREFIX}*)")
    clip, openclip = has(CLIP_PREFIX), has(OPENCLIP_PREFIX)
    if has(SDXL_PREFIX):
        if clip or openclip:
            raise ConversionError(f"{unknown}: it mixes SD 1.x / 2.x text towers "
                                  f"(cond_stage_model.*) with SDXL ones ({SDXL_PREFIX}*)")
        for family in ("SDXL base", "SDXL refiner"):  # keys left over are reported later
            if all(has(t.prefix) for t in LAYOUTS[family].text):
                return family
        raise ConversionError(f"{unknown}: its text towers are neither SDXL base's "
                              f"({SDXL_PREFIX}0.transformer.* CLIP-L and {SDXL_PREFIX}1.model.* "
                              f"bigG) nor the refiner's ({SDXL_PREFIX}0.model.* bigG alone)")
    if has(UNET_PREFIX + "label_emb."):
        raise ConversionError(f"{unknown}: its U-Net is class-conditioned (label_emb) without "
                              f"SDXL's text towers ({SDXL_PREFIX}*), as SD 2.x unCLIP is, "
                              "which diffusion_jax does not support")
    if clip == openclip:
        raise ConversionError(f"{unknown}: it needs exactly one text tower, {CLIP_PREFIX}* "
                              f"(SD 1.x) or {OPENCLIP_PREFIX}* (SD 2.x), or SDXL's "
                              f"{SDXL_PREFIX}*")
    return "SD 1.x" if clip else "SD 2.x"


def _transformer_depths(sd: Mapping[str, Any], blocks: list[str],
                        prefix: str = UNET_PREFIX) -> list[int | None]:
    """Transformer blocks per level (counted in its first input block), None where a level
    has no attention; the middle block's count is the last level's (diffusers builds both
    from one entry)."""
    count = lambda block: len(_indices(sd, f"{prefix}{block}.1.transformer_blocks."))
    depths = [count(block) or None for block in blocks]
    depths[-1] = depths[-1] or count("middle_block")
    return depths


def infer_encoder(sd: Mapping[str, Any], path: Path, prefix: str = UNET_PREFIX) -> dict:
    """The config fields the shapes of the encoder half (time_embed, input_blocks,
    middle_block, label_emb) determine: the U-Net's, or a ControlNet's (its own prefix)."""
    shape = lambda key: _shape(sd, prefix + key, path)
    inputs = _indices(sd, prefix + "input_blocks.")
    downsamplers = [i for i in inputs if f"{prefix}input_blocks.{i}.0.op.weight" in sd]
    levels = len(downsamplers) + 1
    layers_per_block, rest = divmod(len(inputs) - 1 - len(downsamplers), levels)
    if rest or layers_per_block < 1:
        raise ConversionError(f"{path}: unknown architecture: {len(inputs)} input blocks "
                              f"do not make {levels} levels of equal depth")
    firsts = [f"input_blocks.{1 + level * (layers_per_block + 1)}" for level in range(levels)]
    down_attention = [f"{prefix}{b}.1.proj_in.weight" in sd for b in firsts]
    inferred = {
        "in_channels": shape("input_blocks.0.0.weight")[1],
        "block_out_channels": [shape(f"{b}.0.out_layers.3.weight")[0] for b in firsts],
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "cross_attention_dim": shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(shape("middle_block.1.proj_in.weight")) == 2,
        "transformer_layers_per_block": _transformer_depths(sd, firsts, prefix),
    }
    if any(key.startswith(prefix + "label_emb.") for key in sd):
        # SDXL's micro-conditioning MLP reads pooled text + sinusoids of 5 or 6 numbers.
        inferred.update(addition_embed_type="text_time",
                        projection_class_embeddings_input_dim=shape("label_emb.0.0.weight")[1])
    return inferred


def infer_unet(sd: Mapping[str, Any], path: Path) -> dict:
    """The U-Net config fields the shapes determine."""
    inferred = infer_encoder(sd, path)
    step = inferred["layers_per_block"] + 1
    up_attention = [f"{UNET_PREFIX}output_blocks.{i * step}.1.proj_in.weight" in sd
                    for i in range(len(inferred["block_out_channels"]))]
    inferred["out_channels"] = _shape(sd, UNET_PREFIX + "out.2.weight", path)[0]
    inferred["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention]
    return inferred


def infer_vae(sd: Mapping[str, Any], path: Path) -> dict:
    shape = lambda key: _shape(sd, VAE_PREFIX + key, path)
    levels = _indices(sd, VAE_PREFIX + "encoder.down.")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels],
        "layers_per_block": len(_indices(sd, VAE_PREFIX + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "latent_channels": shape("quant_conv.weight")[0] // 2,
    }


def infer_text_encoder(sd: Mapping[str, Any], layout: TextLayout, kind: str,
                       path: Path) -> dict:
    if not layout.openclip:
        prefix = layout.prefix + "text_model."
        shape = lambda key: _shape(sd, prefix + key, path)
        vocab_size, hidden_size = shape("embeddings.token_embedding.weight")
        return {
            "vocab_size": vocab_size, "hidden_size": hidden_size,
            "max_position_embeddings": shape("embeddings.position_embedding.weight")[0],
            "num_hidden_layers": len(_indices(sd, prefix + "encoder.layers.")),
            "intermediate_size": shape("encoder.layers.0.mlp.fc1.weight")[0],
        }
    shape = lambda key: _shape(sd, layout.prefix + key, path)
    vocab_size, hidden_size = shape("token_embedding.weight")
    blocks = len(_indices(sd, layout.prefix + "transformer.resblocks."))
    inferred = {
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "max_position_embeddings": shape("positional_embedding")[0],
        # SD 2.x conditions on the penultimate layer: diffusers' tower stops before the last.
        "num_hidden_layers": blocks - 1 if layout.drop_last else blocks,
        "intermediate_size": shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
    }
    if kind == "clip_text_projection":  # OpenCLIP's projection is [width, projection_dim]
        inferred["projection_dim"] = shape("text_projection")[1]
    return inferred


def _family_defaults(name: str, family: str, inferred: Mapping[str, Any], path: Path) -> dict:
    defaults = dict(FAMILY_DEFAULTS[family][name])
    if name in LAYOUTS[family].system.text_names:
        defaults["num_attention_heads"] = inferred["hidden_size"] // HEAD_CHANNELS
    if name == "unet" and family != "SD 1.x":
        channels = inferred["block_out_channels"]
        if any(c % HEAD_CHANNELS for c in channels):
            raise ConversionError(f"{path}: U-Net widths {channels} are not multiples of "
                                  f"{HEAD_CHANNELS}, so {family}'s head count does not apply; "
                                  "give the unet section with --config")
        defaults["attention_head_dim"] = [c // HEAD_CHANNELS for c in channels]
    return defaults


def _as_config_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _fill_depths(seen: list, default: Any) -> int | tuple[int, ...]:
    """Transformer depths per level: the default's where a level has no attention (its depth
    makes no weights); one int when all agree, as the released config.json files write it."""
    if isinstance(default, int) or len(default) != len(seen):
        default = [default if isinstance(default, int) else 1] * len(seen)
    depths = [d if s is None else s for s, d in zip(seen, default)]
    return depths[0] if len(set(depths)) == 1 else tuple(depths)


def model_config(name: str, family: str, inferred: Mapping[str, Any],
                 given: Mapping[str, Any] | None, path: Path):
    """The component's config: the caller's section checked against the weights, or the
    family defaults completed by what the weights show."""
    component = LAYOUTS[family].system.tower(name).component
    inferred = dict(inferred)
    seen_depths = inferred.pop("transformer_layers_per_block", None)  # the U-Net's
    if given is None:
        defaults = _family_defaults(name, family, inferred, path)
        if seen_depths is not None:
            inferred["transformer_layers_per_block"] = _fill_depths(
                seen_depths, defaults.get("transformer_layers_per_block", 1))
        return component.config_from_dict({**defaults, **inferred})
    config = component.config_from_dict(given)
    for key, value in inferred.items():
        if _as_config_value(getattr(config, key)) != _as_config_value(value):
            raise ConversionError(f"{path}: the weights have {name}.{key}={value!r} but the "
                                  f"config says {getattr(config, key)!r}")
    if seen_depths is not None and any(
            s not in (None, d) for s, d in zip(seen_depths, config.depth_per_block)):
        raise ConversionError(f"{path}: the weights have {seen_depths} transformer blocks per "
                              f"level (None: no attention) but the config says "
                              f"transformer_layers_per_block={config.transformer_layers_per_block!r}")
    return config


# ----------------------------------------------------------------------------- key mapping

_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               # SDXL's micro-conditioning MLP: SGM's label_emb, Sequential(Linear, SiLU, Linear).
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _unet_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_NAMES.get(head, head)}.{tail}"


def unet_ldm_key(key: str, config) -> str:
    """LDM name (without prefix) of a diffusers U-Net state-dict key."""
    step = config.layers_per_block + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = 1 + int(m[1]) * step + int(m[3])
        return (f"input_blocks.{block}.0.{_unet_resnet(m[4])}" if m[2] == "resnets"
                else f"input_blocks.{block}.1.{m[4]}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(m[1]) * step + int(m[3])
        return (f"output_blocks.{block}.0.{_unet_resnet(m[4])}" if m[2] == "resnets"
                else f"output_blocks.{block}.1.{m[4]}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        # The upsampler follows the last resnet, and its attention when the block has one.
        index = 2 if config.up_block_types[i] == "CrossAttnUpBlock2D" else 1
        return f"output_blocks.{i * step + config.layers_per_block}.{index}.conv.{m[2]}"
    raise ConversionError(f"no LDM name for U-Net parameter {key}")


_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                        "to_out.0": "proj_out"}


def vae_ldm_source(key: str, config) -> Source:
    n = len(config.block_out_channels)
    resnet = lambda rest: rest.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}", _identity
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}", _identity
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", _identity
    # The decoder's up blocks run deepest first in diffusers, LDM numbers them by resolution.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}", _identity
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}", _identity
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}", _identity
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_NAMES[m[2]]}.{m[3]}", _conv_1x1_to_linear
    return key, _identity  # conv_in, conv_out, quant_conv, post_quant_conv: same names


_OPENCLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                         "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight",
                   "final_layer_norm.bias": "ln_final.bias"}


def openclip_source(key: str) -> Source:
    """OpenCLIP name (without prefix) of a transformers CLIP key (without `text_model.`)."""
    if key in _OPENCLIP_FIXED:
        return _OPENCLIP_FIXED[key], _identity
    if key == "text_projection.weight":  # OpenCLIP applies x @ P, P stored [width, projection]
        return "text_projection", np.transpose
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise ConversionError(f"no OpenCLIP name for text encoder parameter {key}")
    block = f"transformer.resblocks.{m[1]}"
    if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", m[2]):
        return f"{block}.attn.in_proj_{m[3]}", functools.partial(_third, "qkv".index(qkv[1]))
    return f"{block}.{_OPENCLIP_LAYER_NAMES[m[2]]}.{m[3]}", _identity


def ema_key(key: str) -> str:
    """LDM's name for the EMA copy of a U-Net weight: dots dropped after `model_ema.`."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _sources(name: str, config, layout: Layout, use_ema: bool) -> dict[tuple[str, ...], Source]:
    """Flax param path -> (file key, transform) for every param of the component."""
    component = layout.system.tower(name).component
    text = layout.text_layout(name) if name in layout.system.text_names else None
    sources = {}
    for path in traverse_util.flatten_dict(component.param_shapes(config)):
        if name == "unet":
            ldm = UNET_PREFIX + unet_ldm_key(torch_key(path), config)
            sources[path] = (ema_key(ldm) if use_ema else ldm), _identity
        elif name == "vae":
            ldm, transform = vae_ldm_source(torch_key(path), config)
            sources[path] = VAE_PREFIX + ldm, transform
        elif not text.openclip:
            sources[path] = text.prefix + torch_key(path, component.torch_prefix), _identity
        else:
            ldm, transform = openclip_source(torch_key(path).removeprefix("text_model."))
            sources[path] = text.prefix + ldm, transform
    return sources


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return shape[3], shape[2], shape[0], shape[1]
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    return tuple(shape)


# ----------------------------------------------------------------------------- loading


def _ignored(key: str, layout: Layout, configs: Mapping[str, Any], use_ema: bool) -> bool:
    if key in IGNORED_KEYS or any(key in text.ignored for text in layout.text):
        return True
    if key.startswith(EMA_PREFIX if not use_ema else UNET_PREFIX):
        return True  # the U-Net copy not taken
    return any(text.drop_last and key.startswith(
        f"{text.prefix}transformer.resblocks.{configs[text.tower].num_hidden_layers}.")
        for text in layout.text)  # SD 2.x's dropped last block


def _gather(state_dict: Mapping[str, np.ndarray], configs: Mapping[str, Any], family: str,
            use_ema: bool, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each component's diffusers-named state dict, fetched from the file by its own names;
    one ConversionError listing every missing, unexpected and mis-shaped key."""
    layout = LAYOUTS[family]
    used, missing, mismatched, converted = set(), set(), [], {}
    for name, config in configs.items():
        component = layout.system.tower(name).component
        converted[name] = fetch(state_dict, _sources(name, config, layout, use_ema),
                                component.param_shapes(config), component.torch_prefix,
                                used, missing, mismatched)
    unexpected = sorted(k for k in state_dict if k not in used
                        and not _ignored(k, layout, configs, use_ema))
    problems = key_report(missing, unexpected, mismatched)
    if problems:
        raise ConversionError(f"{path} does not match a {family} model: {problems}")
    return converted


def fetch(state_dict: Mapping[str, np.ndarray], sources: Mapping[tuple, Source], template,
          torch_prefix: str, used: set, missing: set, mismatched: list,
          describe: Callable | None = None) -> dict[str, np.ndarray]:
    """One tower's state dict under diffusers' names, each param fetched from the file by
    `sources` (Flax path -> (file key, transform)) and checked against `template`'s shape;
    adds to `used`, `missing` and `mismatched` (report lines, the expected shape as
    `describe(transform, shape)` gives it: by default the file's, `_file_shape`)."""
    describe = describe or _file_shape
    flat = traverse_util.flatten_dict(template)
    converted = {}
    for param_path, (key, transform) in sources.items():
        if key not in state_dict:
            missing.add(key)
            continue
        used.add(key)
        value = transform(np.asarray(state_dict[key]))
        expected = _torch_shape(param_path, flat[param_path].shape)
        if tuple(value.shape) != expected:
            mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, model "
                              f"expects {describe(transform, expected)}")
            continue
        converted[torch_key(param_path, torch_prefix)] = value
    return converted


def _file_shape(transform: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
    # The shape the file should hold, for the report; only a transpose changes it.
    return shape[::-1] if transform is np.transpose else shape


def _check_time_ids(system: system_lib.System, config: Mapping[str, Any], path: Path) -> None:
    try:
        system_lib.time_ids_width(system, config)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}; give the unet section with --config") from None


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any] | None,
                           path: Path, use_ema: bool = False) -> tuple[dict, dict]:
    """(params by item, checkpoint config) from a single file's state dict."""
    given = dict(config or {})
    family = detect_family(state_dict, path)
    layout, defaults = LAYOUTS[family], FAMILY_DEFAULTS[family]
    system = layout.system
    if use_ema and not any(k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS for k in state_dict):
        raise ConversionError(f"{path} has no EMA weights ({EMA_PREFIX}*): convert without "
                              "--ema (an 'emaonly' file already stores the EMA U-Net as the model)")
    inferred = {"unet": infer_unet(state_dict, path), "vae": infer_vae(state_dict, path)}
    for text in layout.text:
        inferred[text.tower] = infer_text_encoder(state_dict, text, system.tower(text.tower).kind,
                                                  path)
    configs = {name: model_config(name, family, inferred[name], given.get(name), path)
               for name in system.names}
    checkpoint_config = {name: configs[name].to_dict() for name in system.names}
    checkpoint_config["schedule"] = dict(given.get("schedule") or defaults["schedule"])
    for tower in system.text_towers:
        checkpoint_config[tower.tokenizer] = dict(
            given.get(tower.tokenizer) or {
                **defaults[tower.tokenizer],
                "max_length": configs[tower.name].max_position_embeddings})
    if system != system_lib.STABLE_DIFFUSION:
        checkpoint_config[system_lib.SYSTEM_SECTION] = system.to_dict()
        _check_time_ids(system, checkpoint_config, path)
    pipeline = given.get(system_lib.PIPELINE_SECTION) or defaults.get(system_lib.PIPELINE_SECTION)
    if pipeline:
        checkpoint_config[system_lib.PIPELINE_SECTION] = dict(pipeline)
    converted = _gather(state_dict, configs, family, use_ema, path)
    items = {tower.name: state_dict_to_params(
                 converted[tower.name], tower.component.param_shapes(configs[tower.name]),
                 prefix=tower.component.torch_prefix, source=str(path))
             for tower in system.towers}
    return items, checkpoint_config


def read_single_file(src: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                     use_ema: bool = False, base: str | os.PathLike | None = None
                     ) -> tuple[dict, dict]:
    """(params by item, checkpoint config) of a single-file SD 1.x / 2.x or SDXL checkpoint,
    of a ControlNet in its original layout (`controlnet_file`), or of a Flux.1 / SD3 file
    completed by the diffusers folder `base` (`flow_file`).

    `config` holds configs/*.py sections (unet, vae, text_encoder(_2), schedule,
    tokenizer(_2), pipeline); each one given replaces the family default and must agree
    with the weights. `use_ema` takes the U-Net from the EMA copy (`model_ema.*`)."""
    path = Path(src)
    state_dict = read_weights_file(path)
    from diffusion_jax.convert import controlnet_file, flow_file

    if flow_file.layout_of(state_dict) is not None:
        if use_ema:
            raise ConversionError(f"{path} is a Flux.1 / SD3 file: it has no EMA weights (no --ema)")
        return flow_file.params_from_state_dict(state_dict, config, path, base)
    if base is not None:
        raise ConversionError(f"--base is for Flux.1 and SD3 single files; {path} is not one "
                              "(a Stable Diffusion 1.x / 2.x / SDXL file holds its whole system)")
    if controlnet_file.prefix_of(state_dict) is not None:  # a ControlNet in the original layout
        if use_ema:
            raise ConversionError(f"{path} is a ControlNet: it has no EMA weights (no --ema)")
        return controlnet_file.params_from_state_dict(state_dict, config, path)
    return params_from_state_dict(state_dict, config, path, use_ema=use_ema)

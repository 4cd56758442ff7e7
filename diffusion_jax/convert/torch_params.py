"""PyTorch state dicts <-> Flax param trees, by the naming convention of `models/`.

Our modules are named after the diffusers / transformers PyTorch modules, a list index `i`
written `name_i`. A Flax leaf path therefore determines its PyTorch key:

    ('down_blocks_0', 'attentions_1', 'transformer_blocks_0', 'attn1', 'to_out_0', 'kernel')
    <-> 'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight'

and the only value changes are layout: Linear weights are transposed, conv weights go from
OIHW to HWIO. The Flax param tree (built with `jax.eval_shape`, no real init) is the template:
every one of its leaves must be found in the state dict with the right shape, and every
state-dict entry must be used, or the conversion fails naming the keys.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Modules that PyTorch holds in a ModuleList / Sequential: `name_i` in Flax is `name.i` there.
INDEXED_MODULES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
    "downsamplers", "upsamplers", "layers", "to_out", "net",
    "block", "layer",  # transformers T5: encoder.block.N.layer.M
    "single_transformer_blocks",  # Flux
    "controlnet_down_blocks", "blocks",  # ControlNet: zero convs, conditioning-embedding convs
})

# A bare nn.Parameter (CLIP's class token) keeps its name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
                  "class_embedding": "class_embedding"}


class ConversionError(ValueError):
    """Weights that do not fit the architecture: the message names every offending key."""


def torch_key(path: tuple[str, ...], prefix: str = "") -> str:
    """The PyTorch state-dict key of a Flax param path."""
    parts = []
    for name in path[:-1]:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        if match and match.group(1) in INDEXED_MODULES:
            parts.extend(match.groups())
        else:
            parts.append(name)
    parts.append(_LEAF_TO_TORCH[path[-1]])
    return prefix + ".".join(parts)


def to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2:  # linear (out, in) -> (in, out)
        return value.T
    return value


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    return value


def _describe(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_report(missing: Iterable[str], unexpected: Iterable[str],
               mismatched: Iterable[str]) -> str:
    """'3 missing key(s): a, b, c; 1 shape mismatch(es): ...' ("" when all three are empty):
    what a state dict lacks, has too many of, and has of the wrong shape."""
    problems = []
    for kind, keys in (("missing key(s)", list(missing)), ("unexpected key(s)", list(unexpected)),
                       ("shape mismatch(es)", list(mismatched))):
        if keys:
            problems.append(f"{len(keys)} {kind}: {_describe(keys)}")
    return "; ".join(problems)


def state_dict_to_params(state_dict: Mapping[str, Any], template: Mapping[str, Any], *,
                         prefix: str = "", ignore: Iterable[str] = (),
                         source: str = "state dict") -> dict:
    """Flax params shaped like `template` (a tree of arrays or ShapeDtypeStructs) from a
    PyTorch state dict of numpy arrays. Keys matching a regex in `ignore` (buffers such as
    `position_ids`) may be present without being used."""
    flat_template = traverse_util.flatten_dict(template)
    ignore_patterns = [re.compile(p) for p in ignore]
    params, missing, mismatched = {}, [], []
    used = set()
    for path, leaf in flat_template.items():
        key = torch_key(path, prefix)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = to_flax_layout(path, np.asarray(state_dict[key]))
        if tuple(value.shape) != tuple(leaf.shape):
            mismatched.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, "
                              f"model expects {tuple(to_torch_layout(path, np.empty(leaf.shape)).shape)}")
            continue
        params[path] = value.astype(np.float32)
    unexpected = [k for k in state_dict if k not in used and k.startswith(prefix)
                  and not any(p.search(k) for p in ignore_patterns)]
    problems = key_report(missing, unexpected, mismatched)
    if problems:
        raise ConversionError(
            f"{source} does not match the model architecture: " + problems
            + ". Check that the config describes the same model as the weights.")
    return traverse_util.unflatten_dict(params)


def params_to_state_dict(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
    """The PyTorch state dict (numpy float32, contiguous) of a Flax param tree."""
    return {
        torch_key(path, prefix): np.ascontiguousarray(to_torch_layout(path, np.asarray(value, np.float32)))
        for path, value in traverse_util.flatten_dict(params).items()
    }

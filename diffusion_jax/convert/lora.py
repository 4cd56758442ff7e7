"""LoRA files people share (kohya / A1111, diffusers / PEFT) merged into a system's params.

    loras = [lora.read("style.safetensors"), lora.read("detail.safetensors")]
    params = lora.merge(params, config, [(loras[0], 0.8), (loras[1], 0.5)])

A LoRA stores, per layer, a `down` [r, in] (a conv's [r, in, kh, kw]) and an `up` [out, r]
([out, r, 1, 1]) factor and optionally an alpha; the layer's weight becomes

    W + weight * alpha / r * up @ down        (alpha defaults to r)

in float32 on the default device, before anything is compiled: sampling then runs the
plain model. Several LoRAs add their deltas.

File formats, told apart by their key names:

    kohya / A1111   lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha, the
                    module's dots written as `_`: diffusers names (SD 1.x / 2.x) or the
                    SGM / LDM names of the single files (SDXL: lora_unet_input_blocks_4_1_...);
                    lora_te_ / lora_te1_ (CLIP-L), lora_te2_ (SDXL's bigG); LoCon convs
    diffusers/PEFT  unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.*,
                    text_encoder_2.*, alphas from the safetensors metadata diffusers writes
                    (`lora_adapter_metadata`), else alpha = r; the older .lora.down / .up,
                    .lora_linear_layer.down / .up and attention-processor
                    (attn1.processor.to_q_lora.down) names

The layers are found by the names the converters already give our params
(`torch_params.torch_key`, and `single_file.unet_ldm_key` for the SGM U-Net names), so a
LoRA reaches exactly the weights a converted checkpoint holds. Every key must be used:
a file for another model family, an unsupported kind (DoRA, LoHa, LoKr, ...), a module
matching no layer or a factor of the wrong shape is refused in one line that names it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import system as system_lib
from diffusion_jax.convert import read_weights_file
from diffusion_jax.convert.single_file import unet_ldm_key
from diffusion_jax.convert.torch_params import (ConversionError, to_flax_layout,
                                                to_torch_layout, torch_key)

# kohya's module prefixes -> the diffusers component (our tower) each addresses.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder",
                  "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te1_|lora_te2_|lora_te_)([^.]+)\."
                        r"(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_TOWERS = ("unet", "text_encoder", "text_encoder_2")
_FACTORS = {"lora_A": "down", "lora_B": "up", "lora.down": "down", "lora.up": "up",
            "lora_linear_layer.down": "down", "lora_linear_layer.up": "up",
            "lora_down": "down", "lora_up": "up"}
_DIFFUSERS_FACTOR = re.compile(r"^(.+?)\.(" + "|".join(re.escape(f) for f in _FACTORS)
                               + r")\.weight$")
# diffusers' attention-processor LoRAs: attn1.processor.to_q_lora.down.weight, ...
_PROCESSOR_FACTOR = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\."
                               r"(down|up)\.weight$")
_PROCESSOR_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v",
                               "to_out": "to_out.0"},
                      "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                               "to_out": "out_proj"}}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: per-component LoraConfigs

# Kinds of adapter files that are not a plain low-rank product: refused, never skipped.
_UNSUPPORTED = tuple((re.compile(pattern), kind) for pattern, kind in (
    (r"\.(dora_scale|lora_magnitude_vector)\b", "DoRA"), (r"\.hada_", "LoHa (LyCORIS)"),
    (r"\.lokr_", "LoKr (LyCORIS)"), (r"\.lora_mid\.", "LoCon with a Tucker (lora_mid) factor"),
    (r"\.diff(_b)?$", "a LyCORIS full weight difference"), (r"\.[wb]_norm$", "a LyCORIS norm"),
    (r"\.(lora_B|lora_up)\.bias$", "LoRA with a bias"), (r"\.oft_", "OFT"), (r"\.ia3_", "IA3")))
# The cross-attention context width of the released families, to say which a LoRA is for.
FAMILY_BY_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL base", 1280: "SDXL refiner"}


@dataclasses.dataclass(frozen=True)
class Module:
    """One layer's factors as a file holds them."""

    tower: str  # the diffusers component it addresses: unet, text_encoder, text_encoder_2
    key: str  # its name in the file, for messages (lora_unet_..., unet.down_blocks...)
    name: str  # the name looked up: kohya's underscored one, or the dotted diffusers one
    kohya: bool
    down: np.ndarray  # [r, in] or [r, in, kh, kw]
    up: np.ndarray  # [out, r] or [out, r, 1, 1]
    scale: float  # alpha / r (PEFT's rsLoRA: alpha / sqrt(r))


@dataclasses.dataclass(frozen=True)
class LoraFile:
    path: str
    modules: tuple[Module, ...]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A LoRA-able weight of ours: its param path and PyTorch-layout shape."""

    path: tuple[str, ...]
    torch_shape: tuple[int, ...]


# ----------------------------------------------------------------------------- reading


def _metadata(path: Path) -> dict:
    """diffusers' per-component LoraConfig values ({"unet.lora_alpha": 8, ...}), if any."""
    if path.suffix != ".safetensors":
        return {}
    import safetensors

    with safetensors.safe_open(path, framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise ValueError(f"LoRA {path}: its {METADATA_KEY} metadata is not JSON; re-save the "
                         "file with diffusers' save_lora_weights") from None


def _check_supported(path: Path, keys: Sequence[str], metadata: Mapping[str, Any]) -> None:
    for pattern, kind in _UNSUPPORTED:
        found = [k for k in keys if pattern.search(k)]
        if found:
            raise ValueError(f"LoRA {path}: {kind} is not supported ({found[0]}); only plain "
                             "LoRA (lora_down/lora_up, lora_A/lora_B) and LoCon convs are: "
                             "use a plain LoRA, or merge this one into the checkpoint first")
    if any(metadata.get(f"{t}.use_dora") for t in _DIFFUSERS_TOWERS):
        raise ValueError(f"LoRA {path}: DoRA is not supported (its metadata says use_dora); "
                         "use a plain LoRA, or merge this one into the checkpoint first")


def _peft_alpha(metadata: Mapping[str, Any], tower: str, module: str, rank: int
                ) -> tuple[float, bool]:
    """(alpha, rsLoRA) of a diffusers-format module: its LoraConfig's alpha_pattern entry
    (the first pattern matching, as PEFT picks it), lora_alpha, else the rank."""
    rslora = bool(metadata.get(f"{tower}.use_rslora"))
    for pattern, alpha in (metadata.get(f"{tower}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha), rslora
    return float(metadata.get(f"{tower}.lora_alpha", rank)), rslora


def _diffusers_name(key: str) -> tuple[str, str, str] | None:
    """(tower, dotted module name, "down" | "up" | "alpha") of a diffusers-format key."""
    tower, rest = key.split(".", 1) if key.split(".", 1)[0] in _DIFFUSERS_TOWERS else ("unet", key)
    if m := _PROCESSOR_FACTOR.match(rest):
        targets = _PROCESSOR_TARGETS["unet" if tower == "unet" else "text"]
        return tower, f"{m[1]}.{targets[m[2]]}", m[3]
    if m := _DIFFUSERS_FACTOR.match(rest):
        return tower, m[1].replace(".processor", ""), _FACTORS[m[2]]
    if rest.endswith(".alpha"):
        return tower, rest[:-len(".alpha")].replace(".processor", ""), "alpha"
    return None


def read(path: str | os.PathLike) -> LoraFile:
    """The modules of a LoRA file (.safetensors, or .ckpt / .pt through
    `torch.load(weights_only=True)`): factors as float32 and each one's alpha / r."""
    path = Path(path)
    state_dict = read_weights_file(path)
    metadata = _metadata(path)
    _check_supported(path, list(state_dict), metadata)
    parts: dict[tuple[str, str, bool], dict[str, np.ndarray]] = {}
    keys: dict[tuple[str, str, bool], str] = {}
    unknown = []
    for key, value in state_dict.items():
        if m := _KOHYA_KEY.match(key):
            tower, name, kind, kohya = KOHYA_PREFIXES[m[1]], m[2], _KOHYA_PARTS[m[3]], True
            shown = m[1] + m[2]
        elif parsed := _diffusers_name(key):
            (tower, name, kind), kohya = parsed, False
            shown = f"{tower}.{name}"
        else:
            unknown.append(key)
            continue
        parts.setdefault((tower, name, kohya), {})[kind] = np.asarray(value, np.float32)
        keys[(tower, name, kohya)] = shown
    if unknown:
        raise ValueError(
            f"LoRA {path}: {len(unknown)} of {len(state_dict)} keys are not LoRA factors of a "
            f"known format ({', '.join(sorted(unknown)[:3])}); expected kohya names "
            "(lora_unet_*.lora_down.weight / .lora_up.weight / .alpha) or diffusers / PEFT "
            "ones (unet.*.lora_A.weight / .lora_B.weight)")
    if not parts:
        raise ValueError(f"LoRA {path} holds no weights")
    modules = []
    for (tower, name, kohya), factors in parts.items():
        if "down" not in factors or "up" not in factors:
            lacking = "up" if "down" in factors else "down"
            raise ValueError(f"LoRA {path}: {keys[tower, name, kohya]} has no {lacking} factor: "
                             "a truncated or hand-edited file")
        down, up = factors["down"], factors["up"]
        rank = down.shape[0]
        if "alpha" in factors:
            alpha, rslora = float(factors["alpha"].reshape(-1)[0]), False
        elif kohya:
            alpha, rslora = float(rank), False
        else:
            alpha, rslora = _peft_alpha(metadata, tower, name, rank)
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        modules.append(Module(tower, keys[tower, name, kohya], name, kohya, down, up, scale))
    return LoraFile(str(path), tuple(modules))


# ----------------------------------------------------------------------------- our layers


def layers(system: system_lib.System, config: Mapping[str, Any], tower: str
           ) -> dict[str, Layer]:
    """{dotted module name: Layer} of a tower's Linear and conv weights, under every name a
    LoRA file may use: the diffusers / transformers one, for the U-Net also the SGM / LDM
    one of the single files, for text towers with and without transformers' `text_model.`."""
    component = system.tower(tower).component
    config_ = system_lib.tower_config(system.tower(tower), config)
    found = {}
    for path, leaf in traverse_util.flatten_dict(component.param_shapes(config_)).items():
        if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
            continue
        layer = Layer(path, tuple(to_torch_layout(path, np.empty(leaf.shape, np.bool_)).shape))
        key = torch_key(path, component.torch_prefix)
        names = [key]
        if tower == system.denoiser.name:
            try:
                names.append(unet_ldm_key(key, config_))
            except ConversionError:
                pass  # a layer the single files do not hold
        elif key.startswith("text_model."):
            names.append(key.removeprefix("text_model."))
        else:
            names.append("text_model." + key)
        for name in names:
            found[name.removesuffix(".weight")] = layer
    return found


def _example_names(system_layers: Mapping[str, Mapping[str, Layer]], kohya: bool) -> str:
    """Two names of ours as a file of that format would write them."""
    prefix = {tower: next(p for p, t in KOHYA_PREFIXES.items() if t == tower)
              for tower in _DIFFUSERS_TOWERS}
    shown = []
    for tower, names in system_layers.items():
        name = next((n for n in names if n.endswith(("to_q", "q_proj"))), next(iter(names)))
        shown.append(prefix[tower] + name.replace(".", "_") + ".lora_down.weight" if kohya
                     else f"{tower}.{name}.lora_A.weight")
    return ", ".join(shown[:2])


def _context_width(system_layers: Mapping[str, Mapping[str, Layer]]) -> int | None:
    for name, layer in system_layers.get("unet", {}).items():
        if name.endswith("attn2.to_k"):
            return layer.torch_shape[1]
    return None


def _family(width: int) -> str:
    return f" ({FAMILY_BY_CONTEXT[width]})" if width in FAMILY_BY_CONTEXT else ""


def _check_family(lora: LoraFile, system: system_lib.System,
                  system_layers: Mapping[str, Mapping[str, Layer]]) -> None:
    """A LoRA for another model family, told by the towers it addresses and the width of
    its cross-attention keys and values."""
    for module in lora.modules:
        if module.tower not in system.names:
            raise ValueError(
                f"LoRA {lora.path} is for another model family: {module.key} addresses "
                f"{module.tower}, which this checkpoint does not have (it has "
                f"{', '.join(system.names)}); use a LoRA made for this model"
                + (" (lora_te2_ / text_encoder_2: SDXL's second text tower)"
                   if module.tower == "text_encoder_2" else ""))
    ours = _context_width(system_layers)
    for module in lora.modules:
        if ours and module.tower == "unet" and re.search(r"attn2[._]to_[kv]$", module.name) \
                and module.down.shape[1] != ours:
            raise ValueError(
                f"LoRA {lora.path} is for another model family: its cross-attention reads "
                f"{module.down.shape[1]}-wide text features{_family(module.down.shape[1])} "
                f"({module.key}), this checkpoint's U-Net {ours}-wide ones{_family(ours)}; "
                "use a LoRA made for this model")


def _resolve(lora: LoraFile, system_layers: Mapping[str, Mapping[str, Layer]]
             ) -> list[tuple[Module, Layer]]:
    """Each module with the layer it changes; every module must find one, of its shape."""
    by_name = {(tower, kohya): {(n.replace(".", "_") if kohya else n): layer
                                for n, layer in names.items()}
               for tower, names in system_layers.items() for kohya in (False, True)}
    matched, unmatched = [], []
    for module in lora.modules:
        layer = by_name[module.tower, module.kohya].get(module.name)
        (matched if layer else unmatched).append((module, layer))
    if unmatched:
        kohya = unmatched[0][0].kohya
        raise ValueError(
            f"LoRA {lora.path}: {len(unmatched)} of {len(lora.modules)} modules match no layer "
            f"of this checkpoint ({len(matched)} matched), e.g. "
            f"{', '.join(m.key for m, _ in unmatched[:3])}; its layers are named like "
            f"{_example_names(system_layers, kohya)}: a LoRA for another model?")
    for module, layer in matched:
        out, *rest = layer.torch_shape
        fits = (module.up.shape[0] == out and module.up.shape[1] == module.down.shape[0]
                and module.up.shape[2:] in ((), (1, 1))
                and (module.down.shape[1:] == tuple(rest)
                     or (module.down.ndim == 2 and module.down.shape[1] == math.prod(rest)
                         and rest[1:] in ([], [1, 1]))))
        if not fits:
            raise ValueError(
                f"LoRA {lora.path}: {module.key} has shapes down {tuple(module.down.shape)}, "
                f"up {tuple(module.up.shape)}, which do not make that layer's "
                f"{layer.torch_shape} weight: a LoRA for another model size or family")
    return matched


# ----------------------------------------------------------------------------- merging


def merge(params: Mapping[str, Any], config: Mapping[str, Any],
          loras: Sequence[tuple[LoraFile, float]]) -> dict:
    """`params` ({tower name: params}) with each LoRA's deltas times its user weight added,
    computed in float32 on the default device and returned as host arrays (which the
    pipeline places on its mesh, on one host or several); the towers no LoRA touches are
    returned as they are."""
    system = system_lib.from_config(config)
    towers = {m.tower for lora, _ in loras for m in lora.modules}
    system_layers = {t: layers(system, config, t) for t in towers if t in system.names}
    deltas: dict[tuple[str, tuple[str, ...]], list] = {}
    for lora, weight in loras:
        _check_family(lora, system, system_layers)
        for module, layer in _resolve(lora, system_layers):
            deltas.setdefault((module.tower, layer.path), []).append(
                (weight * module.scale, module, layer))
    changed = {tower for tower, _ in deltas}
    flat = {name: traverse_util.flatten_dict(params[name]) for name in changed}
    for (tower, path), terms in deltas.items():
        layer = terms[0][2]
        flat[tower][path] = np.asarray(_merged(  # back on the host, as the checkpoint's are
            jnp.asarray(flat[tower][path], jnp.float32),
            [m.up.reshape(m.up.shape[0], -1) for _, m, _ in terms],
            [m.down.reshape(m.down.shape[0], -1) for _, m, _ in terms],
            np.asarray([scale for scale, _, _ in terms], np.float32), leaf=path[-1],
            torch_shape=layer.torch_shape))
    return {**params, **{name: traverse_util.unflatten_dict(flat[name]) for name in changed}}


@functools.partial(jax.jit, static_argnames=("leaf", "torch_shape"))
def _merged(weight, ups, downs, scales, *, leaf, torch_shape):
    """weight + sum_i scales[i] * ups[i] @ downs[i], the sum shaped [out, in, (kh, kw)] as
    PyTorch holds the layer and laid out as our `leaf` param. One compile per shape."""
    delta = sum(scales[i] * jnp.matmul(up, down, precision=jax.lax.Precision.HIGHEST)
                for i, (up, down) in enumerate(zip(ups, downs)))
    return weight + to_flax_layout((leaf,), delta.reshape(torch_shape))


def parse_flag(spec: str) -> tuple[str, float]:
    """`--lora FILE[:WEIGHT]` -> (FILE, WEIGHT), weight default 1.0; the file must exist."""
    file, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and not os.path.isfile(spec):
        try:
            file, weight = head, float(tail)
        except ValueError:
            raise ValueError(f"--lora {spec}: {tail!r} is not a number and {spec} is not a "
                             "file; give FILE[:WEIGHT], e.g. style.safetensors:0.8") from None
    if not math.isfinite(weight):
        raise ValueError(f"--lora {spec}: the weight must be a finite number")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--lora {spec}: LoRA file {file} does not exist")
    return file, weight

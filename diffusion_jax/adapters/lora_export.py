"""A LoRA run's factors written as the adapter files people share:

    peft    unet.<diffusers module>.lora_A.weight / .lora_B.weight, text_encoder.<transformers
            module>.lora_A / lora_B (text_model.encoder.layers.0.self_attn.q_proj), and the
            per-component LoraConfig (r, lora_alpha, target_modules) under the
            `lora_adapter_metadata` safetensors metadata key, as diffusers'
            `save_lora_weights` writes them: `load_lora_weights` reads the file
    kohya   lora_unet_<module with _ for .>.lora_down.weight / .lora_up.weight / .alpha
            (SD 1.x / 2.x: diffusers module names; SDXL: the SGM names kohya trains with,
            lora_unet_input_blocks_4_1_...), lora_te_ (lora_te1_ / lora_te2_ for SDXL)

The module names are the ones the converters give our params (`torch_params.torch_key`),
the names convert/lora.py resolves when it reads such a file back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffusion_jax import checkpoint
from diffusion_jax import system as system_lib
from diffusion_jax.adapters import lora_train
from diffusion_jax.convert.lora import METADATA_KEY
from diffusion_jax.convert.single_file import unet_ldm_key
from diffusion_jax.convert.torch_params import torch_key

FORMATS = ("peft", "kohya")


def _torch_module(system: system_lib.System, module: str) -> tuple[str, str]:
    """(tower, PyTorch module name) of a module path "tower/.../layer"."""
    tower, *path = module.split("/")
    prefix = system.tower(tower).component.torch_prefix
    return tower, torch_key((*path, "kernel"), prefix).removesuffix(".weight")


def _is_sdxl(system: system_lib.System) -> bool:
    return system in (system_lib.SDXL_BASE, system_lib.SDXL_REFINER)


def _kohya_name(system: system_lib.System, config: Mapping[str, Any], tower: str,
                name: str) -> str:
    if tower == system.denoiser.name:
        if _is_sdxl(system):  # kohya trains SDXL on the SGM checkpoint: its block names
            unet = system_lib.tower_config(system.denoiser, config)
            name = unet_ldm_key(name + ".weight", unet).removesuffix(".weight")
        return "lora_unet_" + name.replace(".", "_")
    if len(system.text_towers) == 1 and not _is_sdxl(system):
        prefix = "lora_te_"
    else:
        prefix = f"lora_te{system.text_names.index(tower) + 1}_"
        if system == system_lib.SDXL_REFINER:
            prefix = "lora_te2_"  # the refiner's one tower is SDXL's second
    return prefix + name.replace(".", "_")


def state_dict(lora: Mapping[str, Any], config: Mapping[str, Any], to: str
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, safetensors metadata) of the factors `lora` of a run with checkpoint
    config `config`, in the format `to`."""
    system = system_lib.from_config(config)
    section = lora_train.section(config)
    rank, alpha = int(section["rank"]), float(section["alpha"])
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, list[str]] = {}
    for module, factors in sorted(lora_train.modules(lora).items()):
        tower, name = _torch_module(system, module)
        down, up = (np.ascontiguousarray(factors[k], np.float32) for k in ("down", "up"))
        if to == "peft":
            tensors[f"{tower}.{name}.lora_A.weight"] = down
            tensors[f"{tower}.{name}.lora_B.weight"] = up
            # transformers 5's CLIPTextModel has no `text_model.` level: the name without it
            # is a suffix of the module's name under both, which is how PEFT matches targets.
            targets.setdefault(tower, []).append(name.removeprefix("text_model."))
        else:
            key = _kohya_name(system, config, tower, name)
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": np.asarray(alpha, np.float32)})
    metadata = {"format": "pt"}
    if to == "peft":  # diffusers' LoraConfig per component: target_modules the exact names
        config_values = {f"{tower}.{field}": value for tower, names in targets.items()
                         for field, value in (("r", rank), ("lora_alpha", alpha),
                                              ("target_modules", names))}
        metadata[METADATA_KEY] = json.dumps(config_values, indent=2, sort_keys=True)
    return tensors, metadata


def export(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, *, to: str,
           step: int | None = None, use_ema: bool = True) -> None:
    """Writes the LoRA factors of a LoRA run's checkpoint (its EMA copy where it has one
    and `use_ema`) as the safetensors file `out`, in the format `to`."""
    import safetensors.numpy

    if to not in FORMATS:
        raise ValueError(f"unknown LoRA export format {to!r}; supported: {list(FORMATS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a LoRA is written as one .safetensors file; name it "
                         "e.g. lora.safetensors")
    directory, step = checkpoint.resolve(checkpoint_dir, step)
    saved = checkpoint.item_names(directory, step)
    if lora_train.ITEM not in saved:
        raise ValueError(f"checkpoint {directory} step {step} holds no LoRA factors (it holds "
                         f"{', '.join(saved)}): --to {to} exports a LoRA run's adapter (e.g. "
                         "configs/lora_sd15.py); --to diffusers writes a whole model")
    ema = lora_train.ITEM + checkpoint.EMA_SUFFIX
    item = ema if use_ema and ema in saved else lora_train.ITEM
    items, config = checkpoint.load(directory, step, items=[item])
    tensors, metadata = state_dict(items[item], config, to)
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out), metadata=metadata)

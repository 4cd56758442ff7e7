"""diffusers pipeline folders (and ControlNet folders) <-> Flax params and the checkpoint config.

A Stable Diffusion folder as `StableDiffusionPipeline.save_pretrained` writes it:

    model_index.json                  (optional when reading)
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors | .bin | sharded
    vae/           config.json + diffusion_pytorch_model[...]
    text_encoder/  config.json (transformers CLIPTextModel) + model[...] | pytorch_model[...]
    scheduler/     scheduler_config.json (optional when reading: SD's schedule is the default)
    tokenizer/     (optional when reading: only its padding token and length are kept; the
                   vocabulary must be CLIP's, which diffusion_jax ships)

An SDXL folder adds `text_encoder_2/` and `tokenizer_2/`; an SD3 / SD3.5 folder
(`StableDiffusion3Pipeline`) has `transformer/` for `unet/`, CLIP-L and CLIP-G with
projections, `text_encoder_3/` (transformers T5EncoderModel) with `tokenizer_3/`, whose
`tokenizer.json` the checkpoint keeps whole (no T5 vocabulary ships with diffusion_jax), and
a FlowMatchEulerDiscreteScheduler.

A ControlNet folder (`ControlNetModel.save_pretrained`: config.json with `_class_name`
ControlNetModel, diffusion_pytorch_model.safetensors) is a checkpoint of `system.CONTROLNET`,
its one model item `controlnet`, and is written back the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
from flax import traverse_util

from diffusion_jax import checkpoint
from diffusion_jax.convert import read_weights_file
from diffusion_jax.diffusion import flow
from diffusion_jax.convert.torch_params import (ConversionError, params_to_state_dict,
                                                state_dict_to_params)
from diffusion_jax import system as system_lib

# The diffusers release whose folder layout and config keys the exported files follow.
DIFFUSERS_FORMAT_VERSION = "0.36.0"

# Full precision first; .bin only where no safetensors file of that precision exists.
_WEIGHTS_PREFERENCE = (("safetensors", None), ("bin", None), ("safetensors", "fp16"), ("bin", "fp16"))
_WEIGHTS_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")



def schedule_defaults() -> dict:
    """Where a scheduler config lacks a key that describes the noise schedule (the
    sampler-specific ones, like PNDM's skip_prk_steps, are the sampler's business): SD 1.x's
    schedule, as configs/sd15.py gives it."""
    from diffusion_jax.configs import sd15

    return sd15.get_config().schedule.to_dict()


_OPTIONAL_SCHEDULE_KEYS = ("rescale_betas_zero_snr",)

# Old diffusers VAE files name the mid-block attention's projections like this.
_LEGACY_VAE_ATTENTION = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

SD_PAD_TOKEN, OPENCLIP_PAD_TOKEN = "<|endoftext|>", "!"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------- reading


def weights_files(component_dir: Path) -> list[Path]:
    """The file(s) holding a component's weights: one file, or the shards an index lists."""
    for ext, variant in _WEIGHTS_PREFERENCE:
        for stem in _WEIGHTS_STEMS:
            name = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
            if (component_dir / name).is_file():
                return [component_dir / name]
            index = component_dir / (f"{stem}.{ext}.index.{variant}.json" if variant
                                     else f"{stem}.{ext}.index.json")
            if index.is_file():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index} has no weight_map: not a sharded-weights index")
                return [component_dir / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{component_dir} holds no weights: expected diffusion_pytorch_model.safetensors, "
        "model.safetensors, a .bin, an .fp16. variant or a *.index.json of shards")


def read_state_dict(component_dir: Path) -> dict[str, np.ndarray]:
    state_dict = {}
    for path in weights_files(component_dir):
        if not path.is_file():
            raise FileNotFoundError(f"weights shard {path} (listed in the index) does not exist")
        state_dict.update(read_weights_file(path))
    return state_dict


def rename_legacy_vae_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """query/key/value/proj_attn (diffusers < 0.14 VAE files) -> to_q/to_k/to_v/to_out.0."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_VAE_ATTENTION.match(key)
        if match:
            key = f"{match[1]}.{_LEGACY_VAE_NAMES[match[2]]}.{match[3]}"
        renamed[key] = value
    return renamed


def _check_class(tower: system_lib.Tower, config_json: Mapping[str, Any], path: Path) -> None:
    library, expected = tower.component.reference_class
    if library == "diffusers":
        found = config_json.get("_class_name", expected)
        ok = found == expected
    else:
        found = config_json.get("architectures") or [expected]
        ok = expected in found
    if not ok:
        raise ValueError(f"{path} describes a {found}, not a {expected}: only the components "
                         "of Stable Diffusion 1.x / 2.x, SDXL and SD3 pipelines are supported")


def read_component(folder: Path, tower: system_lib.Tower,
                   weights: bool = True) -> tuple[dict | None, dict]:
    """(params, normalized config dict) of one tower of a pipeline folder (params None
    without `weights`: its config alone)."""
    if not (folder / tower.name / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Stable Diffusion diffusers folder: "
                                f"{folder / tower.name / 'config.json'} does not exist (nor "
                                "is it a ControlNet folder: a config.json of _class_name "
                                "ControlNetModel)")
    return read_model_folder(folder / tower.name, tower, weights)


def read_vae(src: str | os.PathLike) -> tuple[dict, dict]:
    """(params, config) of a VAE given on its own: a diffusers `AutoencoderKL` folder (e.g.
    the fp16-fix SDXL VAE) or a pipeline folder holding one in vae/."""
    folder = Path(src)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--vae {src}: no config.json there (nor in {src}/vae): give a "
                                "diffusers AutoencoderKL folder")
    return read_model_folder(folder, system_lib.Tower("vae", "vae"))


def read_model_folder(component_dir: Path, tower: system_lib.Tower,
                      weights: bool = True) -> tuple[dict | None, dict]:
    """(params, normalized config dict) of a diffusers / transformers model folder (params
    None without `weights`)."""
    component = tower.component
    config_path = component_dir / "config.json"
    config_json = _read_json(config_path)
    _check_class(tower, config_json, config_path)
    try:
        config = component.config_from_dict(config_json)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    if not weights:
        return None, config.to_dict()
    state_dict = read_state_dict(component_dir)
    if tower.kind == "vae":
        state_dict = rename_legacy_vae_keys(state_dict)
    prefix = component.torch_prefix
    if prefix and not any(key.startswith(prefix) for key in state_dict):
        prefix = ""  # transformers 5 saves CLIPTextModel without its `text_model.` level
    params = state_dict_to_params(state_dict, component.param_shapes(config),
                                  prefix=prefix, ignore=component.torch_ignore,
                                  source=f"weights in {component_dir}")
    return params, config.to_dict()


def read_schedule(folder: Path) -> dict:
    """The `schedule` section of a pipeline folder: a FlowMatch scheduler's keys as they are
    (checked by `flow.FlowConfig`), else the DDPM keys with SD's values where absent."""
    path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(path) if path.is_file() else {}
    if flow.is_flow_config(scheduler):
        try:
            return flow.FlowConfig.from_dict(scheduler).to_dict()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if scheduler.get("trained_betas") is not None:
        raise ValueError(f"{path}: trained_betas (an explicit beta list) is not supported; "
                         f"supported beta schedules are named by beta_schedule")
    schedule = {key: scheduler.get(key, default) for key, default in schedule_defaults().items()}
    schedule.update({key: scheduler[key] for key in _OPTIONAL_SCHEDULE_KEYS if key in scheduler})
    return schedule


def default_pad_token(text_config: Mapping[str, Any]) -> str:
    """SD 2.x's OpenCLIP tower (the gelu one) was trained with "!" padding, SD 1.x with EOS."""
    return OPENCLIP_PAD_TOKEN if text_config.get("hidden_act") == "gelu" else SD_PAD_TOKEN


def read_tokenizer(folder: Path, text_config: Mapping[str, Any], name: str = "tokenizer") -> dict:
    """A tokenizer section of the checkpoint (`name`: its folder, "tokenizer" or
    "tokenizer_2"): the padding token and length, after checking its vocabulary is the CLIP
    vocabulary diffusion_jax ships."""
    from diffusion_jax.tokenizer import CLIPTokenizer

    directory = folder / name
    if not directory.is_dir():
        return {"pad_token": default_pad_token(text_config),
                "max_length": text_config["max_position_embeddings"]}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{directory}: {e}") from None
    bundled = CLIPTokenizer.bundled()
    if tokenizer.vocab != bundled.vocab or tokenizer.merges != bundled.merges:
        raise ValueError(f"{directory} holds a vocabulary other than CLIP's "
                         f"({len(tokenizer.vocab)} tokens, {len(tokenizer.merges)} merges); "
                         "diffusion_jax checkpoints use the bundled CLIP vocabulary only")
    return {"pad_token": tokenizer.pad_token, "max_length": tokenizer.max_length}


def read_t5_tokenizer(folder: Path, name: str, max_sequence_length: int) -> dict:
    """A T5 tokenizer section of the checkpoint: the folder's tokenizer.json whole, its
    special tokens, and the pipeline's default `max_sequence_length` as its length."""
    from diffusion_jax.tokenizer import T5Tokenizer

    directory = folder / name
    try:
        tokenizer = T5Tokenizer.from_pretrained(directory, max_length=max_sequence_length)
        return tokenizer.to_section()
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{directory}: {e}") from None


def _check_model_index(folder: Path, system: system_lib.System) -> None:
    path = folder / "model_index.json"
    if not path.is_file():
        return
    index = _read_json(path)
    for tower in system.towers:
        library, cls = tower.component.reference_class
        entry = index.get(tower.name)
        if entry is not None and list(entry)[1:] != [cls]:
            raise ValueError(f"{path}: {tower.name} is {entry}, expected [{library!r}, {cls!r}]: "
                             "only Stable Diffusion 1.x / 2.x, SDXL, SD3 and Flux.1 pipelines "
                             "are supported")


def detect_system(folder: Path) -> system_lib.System:
    """Flux.1 (a transformer beside T5 as text_encoder_2), SD3 (text_encoder_3, a
    transformer), SDXL base (text_encoder and text_encoder_2), SDXL refiner (text_encoder_2
    alone) or SD 1.x / 2.x, from the folder's layout."""
    if (folder / "transformer").is_dir() and _is_t5(folder / "text_encoder_2"):
        return system_lib.FLUX
    if (folder / "text_encoder_3").is_dir() or (folder / "transformer").is_dir():
        return system_lib.SD3
    if (folder / "text_encoder_2").is_dir():
        return (system_lib.SDXL_BASE if (folder / "text_encoder").is_dir()
                else system_lib.SDXL_REFINER)
    return system_lib.STABLE_DIFFUSION


def _is_t5(folder: Path) -> bool:
    path = folder / "config.json"
    return path.is_file() and _read_json(path).get("model_type") == "t5"


def is_model_folder(folder: Path, class_name: str) -> bool:
    """Whether `folder` holds one diffusers model of that class (its config.json says so)."""
    path = folder / "config.json"
    return path.is_file() and _read_json(path).get("_class_name") == class_name


def read_adapter(folder: Path, system: system_lib.System) -> tuple[dict[str, Any], dict]:
    """(params, checkpoint config) of an adapter-only system's one model folder."""
    (tower,) = system.towers
    params, config = read_model_folder(folder, tower)
    return {tower.name: params}, {tower.name: config, system_lib.SYSTEM_SECTION: system.to_dict()}


def read_pipeline(src: str | os.PathLike,
                  without_weights: Collection[str] = ()) -> tuple[dict[str, Any], dict]:
    """(params by item, checkpoint config) of a diffusers Stable Diffusion folder, or of a
    ControlNet folder. The towers named in `without_weights` are read for their configs
    alone (a single file brings their weights)."""
    folder = Path(src)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers folder {folder} does not exist")
    if is_model_folder(folder, "ControlNetModel"):
        return read_adapter(folder, system_lib.CONTROLNET)
    system = detect_system(folder)
    _check_model_index(folder, system)
    items, config = {}, {}
    for tower in system.towers:
        params, config[tower.name] = read_component(folder, tower,
                                                    tower.name not in without_weights)
        if params is not None:
            items[tower.name] = params
    config["schedule"] = read_schedule(folder)
    kind = PIPELINE_KINDS[system]
    for text in system.text_towers:
        config[text.tokenizer] = (
            read_t5_tokenizer(folder, text.tokenizer, kind.max_sequence_length)
            if text.kind == "t5" else read_tokenizer(folder, config[text.name], text.tokenizer))
    if system != system_lib.STABLE_DIFFUSION:
        config[system_lib.SYSTEM_SECTION] = system.to_dict()
    model_index = json.loads((folder / "model_index.json").read_text())
    if "force_zeros_for_empty_prompt" in model_index:  # SDXL pipelines record it (default True)
        config[system_lib.PIPELINE_SECTION] = {
            "force_zeros_for_empty_prompt": bool(model_index["force_zeros_for_empty_prompt"])}
    return items, config


# ----------------------------------------------------------------------------- writing


def component_config_json(tower: system_lib.Tower, config: Mapping[str, Any]) -> dict:
    """config.json of a tower, as diffusers / transformers write it."""
    normalized = tower.component.config_from_dict(config).to_dict()
    library, cls = tower.component.reference_class
    if library == "diffusers":
        return {"_class_name": cls, "_diffusers_version": DIFFUSERS_FORMAT_VERSION, **normalized}
    return {"architectures": [cls], "model_type": _MODEL_TYPES.get(cls, "clip_text_model"),
            **normalized}


# transformers' model_type of a text tower's config.json (CLIP's text towers otherwise).
_MODEL_TYPES = {"T5EncoderModel": "t5"}
# A tokenizer folder's class in model_index.json, by its tower's kind (CLIP's otherwise).
_TOKENIZER_CLASSES = {"t5": "T5TokenizerFast"}


@dataclasses.dataclass(frozen=True)
class PipelineKind:
    """What a diffusers pipeline folder of a system says besides its towers."""

    pipeline_class: str  # model_index.json's _class_name
    scheduler_class: str  # as the releases ship ("" : by prediction type, SD's)
    pipeline_flags: bool  # SDXL's force_zeros_for_empty_prompt / requires_aesthetics_score
    zeros_for_empty_prompt: bool = False  # the release's force_zeros_for_empty_prompt
    max_sequence_length: int = 0  # the pipeline's default T5 token count (none: no T5)


PIPELINE_KINDS = {
    system_lib.STABLE_DIFFUSION: PipelineKind("StableDiffusionPipeline", "", False),
    system_lib.SDXL_BASE: PipelineKind("StableDiffusionXLPipeline", "EulerDiscreteScheduler",
                                       True, zeros_for_empty_prompt=True),
    system_lib.SDXL_REFINER: PipelineKind("StableDiffusionXLImg2ImgPipeline",
                                          "EulerDiscreteScheduler", True),
    system_lib.SD3: PipelineKind("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler",
                                 False, max_sequence_length=256),
    system_lib.FLUX: PipelineKind("FluxPipeline", "FlowMatchEulerDiscreteScheduler", False,
                                  max_sequence_length=512),
}


def pipeline_kind(system: system_lib.System, source: str) -> PipelineKind:
    if system not in PIPELINE_KINDS:
        raise ValueError(f"{source} is not a Stable Diffusion 1.x / 2.x, SDXL, SD3 or Flux.1 system; "
                         "export to diffusers writes those only")
    return PIPELINE_KINDS[system]


def scheduler_class(schedule: Mapping[str, Any], kind: PipelineKind) -> str:
    # As the releases ship: SDXL with Euler; SD with PNDM (epsilon) or DDIM (768-v).
    if flow.is_flow_config(schedule):
        return "FlowMatchEulerDiscreteScheduler"
    if kind.scheduler_class:
        return kind.scheduler_class
    return "DDIMScheduler" if schedule.get("prediction_type") == "v_prediction" else "PNDMScheduler"


def scheduler_config_json(schedule: Mapping[str, Any], kind: PipelineKind) -> dict:
    if flow.is_flow_config(schedule):  # a rectified flow: the scheduler every flow release ships
        return {"_class_name": "FlowMatchEulerDiscreteScheduler",
                "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                **flow.FlowConfig.from_dict(schedule).to_dict()}
    return {"_class_name": scheduler_class(schedule, kind),
            "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
            "trained_betas": None, **schedule}


def model_index_json(config: Mapping[str, Any]) -> dict:
    system = system_lib.from_config(config)
    kind = pipeline_kind(system, "the checkpoint")
    towers = {t.name: list(t.component.reference_class) for t in system.towers}
    tokenizers = {t.tokenizer: ["transformers", _TOKENIZER_CLASSES.get(t.kind, "CLIPTokenizer")]
                  for t in system.text_towers}
    index = {"_class_name": kind.pipeline_class, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
             **towers, **tokenizers,
             "scheduler": ["diffusers", scheduler_class(config["schedule"], kind)]}
    if kind.pipeline_flags:
        # Zeros for an empty negative prompt as the checkpoint says (else as the release);
        # the refiner's U-Net reads an aesthetic score.
        index["force_zeros_for_empty_prompt"] = system_lib.pipeline_option(
            config, "force_zeros_for_empty_prompt", kind.zeros_for_empty_prompt)
        index["requires_aesthetics_score"] = system_lib.time_ids_width(system, config) == 5
    elif kind.pipeline_class == "StableDiffusionPipeline":
        if config["unet"]["in_channels"] == 9:  # latents, mask and masked-image latents
            index["_class_name"] = "StableDiffusionInpaintPipeline"
        index.update(feature_extractor=[None, None], safety_checker=[None, None],
                     requires_safety_checker=False)
    return index


def _check_params(tower: system_lib.Tower, params: Any, config: Mapping[str, Any],
                  source: str) -> None:
    """The params must be exactly the tree the config's model has."""
    name = tower.name
    expected = traverse_util.flatten_dict(system_lib.param_shapes(
        system_lib.from_config(config), config, [name])[name])
    found = traverse_util.flatten_dict(params)
    problems = sorted("/".join(p) + (" missing" if p not in found else
                                     f" {tuple(found[p].shape)} != {tuple(expected[p].shape)}")
                      for p in expected if p not in found or found[p].shape != expected[p].shape)
    problems += sorted("/".join(p) + " unexpected" for p in found if p not in expected)
    if problems:
        raise ConversionError(f"{source}: the {name} params do not fit its config: "
                              + ", ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


def write_model_folder(directory: Path, tower: system_lib.Tower, params: Any,
                       config: Mapping[str, Any]) -> None:
    """config.json and the safetensors weights of one model, into the existing `directory`."""
    import safetensors.numpy

    component = tower.component
    _write_json(directory / "config.json", component_config_json(tower, config))
    state_dict = params_to_state_dict(params, prefix=component.torch_prefix)
    weights = directory / f"{component.weights_stem}.safetensors"
    safetensors.numpy.save_file(state_dict, weights, metadata={"format": "pt"})


def write_pipeline(folder: Path, items: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Writes a diffusers StableDiffusionPipeline folder into the (existing) `folder`."""
    from diffusion_jax.tokenizer import CLIPTokenizer, T5Tokenizer

    system = system_lib.from_config(config)
    for tower in system.towers:
        (folder / tower.name).mkdir()
        write_model_folder(folder / tower.name, tower, items[tower.name], config[tower.name])
    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json",
                scheduler_config_json(config["schedule"], pipeline_kind(system, "the checkpoint")))
    for text in {t.tokenizer: t for t in system.text_towers}.values():
        tokenizer = config[text.tokenizer]
        if text.kind == "t5":
            T5Tokenizer.from_section(tokenizer).save_pretrained(folder / text.tokenizer)
        else:
            CLIPTokenizer.bundled(pad_token=tokenizer["pad_token"], max_length=tokenizer[
                "max_length"]).save_pretrained(folder / text.tokenizer)
    _write_json(folder / "model_index.json", model_index_json(config))


def export_pipeline(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, *,
                    step: int | None = None, use_ema: bool = True) -> None:
    """Checkpoint -> new diffusers folder `out` (written to a temporary sibling, then renamed).
    Each model's EMA params where the checkpoint has them and `use_ema`, as `sample` uses."""
    checkpoint.check_new_directory(out)
    items, config, source = checkpoint.load_models(checkpoint_dir, step, use_ema=use_ema)
    system = system_lib.from_config(config)
    if not system.adapter_only:
        pipeline_kind(system, f"checkpoint {source.directory}")  # refused before writing
    for tower in system.towers:
        _check_params(tower, items[tower.name], config, f"checkpoint {source.directory}")
    with checkpoint.new_directory(out) as tmp:
        if system.adapter_only:  # a ControlNet: its model folder alone
            (tower,) = system.towers
            write_model_folder(tmp, tower, items[tower.name], config[tower.name])
        else:
            write_pipeline(tmp, items, config)

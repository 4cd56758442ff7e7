"""The one description of a model system that everything else iterates.

A system is a denoiser, a VAE, a list of text towers and a list of adapters, each a `Tower`:
the name of its checkpoint item and config section, and its `kind`, which says which model
code builds it (`models.KINDS`). Checkpoint items, conversion, training, the pipeline,
`params` and `bench` take their lists of models from here; a new family is new model modules,
a new kind and a new `System` value, not a branch in each of those files.

    system = from_config(checkpoint_config)     # SD 1.x/2.x when the config has no "system"
    models = build(system, checkpoint_config, dtype=jnp.bfloat16)
    ids = text_inputs(system, checkpoint_config)(["a cat"])    # {"input_ids": [1, 77]}
    cond = encode_text(models, params, ids)                    # {"context": [1, 77, 768]}
    eps = denoise(models, params, x_t, t, cond)

Conditioning is a dict pytree (`context`; `pooled`, `time_ids`; a ControlNet's
`down_residuals` and `mid_residual`): what the text towers give is combined here, and the
denoiser's kind says how it takes the dict. Classifier-free guidance doubles every leaf with
one `tree_map`.

Adapters are models that feed the denoiser (a ControlNet). A ControlNet converted on its own
is a system of that adapter alone (`CONTROLNET`: no denoiser, VAE or text tower), which a
checkpoint holds like any other; `with_adapters` joins it to a base system for sampling.

The checkpoint config holds the description as its `system` section (`System.to_dict`); the
SD 1.x / 2.x checkpoints written before it existed are `STABLE_DIFFUSION`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import KINDS, Component

SYSTEM_SECTION = "system"
CONTEXT_JOINS = ("features", "sequence")
# Pipeline-level facts of a checkpoint (diffusers keeps them in model_index.json):
# `force_zeros_for_empty_prompt` (SDXL base: an empty negative prompt is all-zero
# conditioning, not the encoded empty string). Optional; absent means False.
PIPELINE_SECTION = "pipeline"


@dataclasses.dataclass(frozen=True)
class Tower:
    """One model of the system."""

    name: str  # its checkpoint item and config section ("unet", "text_encoder_2", ...)
    kind: str  # a models.KINDS key: which code builds it and how its outputs are read

    @property
    def component(self) -> Component:
        return KINDS[self.kind]


@dataclasses.dataclass(frozen=True)
class TextTower(Tower):
    """A text encoder: what it reads (its tokenizer's config section, the batch key of its
    ids) and what it gives the conditioning (named outputs of its kind's `encode_text`)."""

    tokenizer: str = "tokenizer"  # config section of its tokenizer
    ids_key: str = "input_ids"  # batch / inputs key of its token ids
    context: str = "last_hidden_state"  # output joined into cond["context"]; "" for none
    pooled: str = ""  # output joined (on the feature axis) into cond["pooled"]; "" for none
    # How its context joins the contexts of the towers before it: "features" side by side
    # (SDXL's CLIP-L + bigG), or "sequence": its tokens after theirs, theirs zero-padded on
    # the feature axis to the wider width (SD3's CLIP-L + CLIP-G tokens, then T5's).
    context_join: str = "features"

    def __post_init__(self):
        if self.context_join not in CONTEXT_JOINS:
            raise ValueError(f"text tower {self.name}: context_join={self.context_join!r}; use "
                             f"one of {list(CONTEXT_JOINS)}")


@dataclasses.dataclass(frozen=True)
class System:
    denoiser: Tower | None  # None (and vae None, no text towers): an adapter-only system
    vae: Tower | None
    text_towers: tuple[TextTower, ...]
    adapters: tuple[Tower, ...] = ()

    @property
    def towers(self) -> tuple[Tower, ...]:
        """Every model, in the order params are initialised (model i from fold_in(seed, i))."""
        base = () if self.denoiser is None else (self.denoiser, self.vae)
        return (*base, *self.text_towers, *self.adapters)

    @property
    def adapter_only(self) -> bool:
        return self.denoiser is None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.towers)

    def tower(self, name: str) -> Tower:
        for t in self.towers:
            if t.name == name:
                return t
        raise KeyError(f"the system has no model {name!r}; it has {list(self.names)}")

    @property
    def text_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.text_towers)

    @property
    def tokenizer_sections(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.tokenizer for t in self.text_towers))

    @property
    def config_sections(self) -> tuple[str, ...]:
        """The sections a checkpoint config of this system holds (besides `system`)."""
        schedule = () if self.adapter_only else ("schedule",)
        return (*self.names, *schedule, *self.tokenizer_sections)

    @property
    def cond_keys(self) -> tuple[str, ...]:
        """The keys of the conditioning the text towers give."""
        return ("context",) + (("pooled",) if any(t.pooled for t in self.text_towers) else ())

    @property
    def ids_keys(self) -> tuple[str, ...]:
        return tuple(t.ids_key for t in self.text_towers)

    def to_dict(self) -> dict:
        d = {"denoiser": self.denoiser and dataclasses.asdict(self.denoiser),
             "vae": self.vae and dataclasses.asdict(self.vae),
             "text_towers": [dataclasses.asdict(t) for t in self.text_towers]}
        if self.adapters:  # absent otherwise: the systems before adapters read the same
            d["adapters"] = [dataclasses.asdict(t) for t in self.adapters]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "System":
        system = cls(d["denoiser"] and Tower(**d["denoiser"]), d["vae"] and Tower(**d["vae"]),
                     tuple(TextTower(**t) for t in d["text_towers"]),
                     tuple(Tower(**t) for t in d.get("adapters", ())))
        if (system.denoiser is None) != (system.vae is None) or (
                system.denoiser is None and (system.text_towers or not system.adapters)):
            raise ValueError("system: a denoiser and a VAE, or neither (an adapter-only system: "
                             "adapters and no text towers)")
        unknown = [t.kind for t in system.towers if t.kind not in KINDS]
        if unknown:
            raise ValueError(f"system: unknown model kind(s) {unknown}; known: {list(KINDS)}")
        if len(set(system.names)) != len(system.names):
            raise ValueError(f"system: model names {list(system.names)} repeat")
        return system


# SD 1.x and 2.x: one CLIP text tower, a U-Net, the KL VAE.
STABLE_DIFFUSION = System(denoiser=Tower("unet", "unet"), vae=Tower("vae", "vae"),
                          text_towers=(TextTower("text_encoder", "clip_text"),))


# SDXL: CLIP ViT-L and OpenCLIP ViT-bigG (with its projection), both read at their
# penultimate layer (768 + 1280 context features); bigG's projected EOS embedding is the
# pooled input of the U-Net's micro-conditioning. The refiner keeps bigG alone.
_BIGG = TextTower("text_encoder_2", "clip_text_projection", tokenizer="tokenizer_2",
                  ids_key="input_ids_2", context="penultimate_hidden_state", pooled="text_embeds")
SDXL_BASE = System(denoiser=Tower("unet", "unet"), vae=Tower("vae", "vae"),
                   text_towers=(TextTower("text_encoder", "clip_text",
                                          context="penultimate_hidden_state"), _BIGG))
SDXL_REFINER = System(denoiser=Tower("unet", "unet"), vae=Tower("vae", "vae"),
                      text_towers=(_BIGG,))

# Flux.1: CLIP ViT-L gives only its pooled output (the modulation), T5-XXL only its context
# (the text tokens of the joint attention); the transformer on 2x2-packed 16-channel latents.
FLUX = System(denoiser=Tower("transformer", "flux"), vae=Tower("vae", "vae"),
              text_towers=(TextTower("text_encoder", "clip_text", context="",
                                     pooled="pooler_output"),
                           TextTower("text_encoder_2", "t5", tokenizer="tokenizer_2",
                                     ids_key="input_ids_2")))

# SD3 / SD3.5: CLIP-L and CLIP-G (both with projections) read at their penultimate layer
# side by side (768 + 1280 features), zero-padded to T5-XXL's 4096, then T5's tokens after
# their 77 (diffusers' StableDiffusion3Pipeline); the pooled input is both projected EOS
# embeddings (768 + 1280).
SD3 = System(denoiser=Tower("transformer", "mmdit"), vae=Tower("vae", "vae"),
             text_towers=(TextTower("text_encoder", "clip_text_projection",
                                    context="penultimate_hidden_state", pooled="text_embeds"),
                          _BIGG,
                          TextTower("text_encoder_3", "t5", tokenizer="tokenizer_3",
                                    ids_key="input_ids_3", context_join="sequence")))

# A ControlNet on its own (diffusers `ControlNetModel`), for SD 1.x/2.x or SDXL alike.
CONTROLNET = System(denoiser=None, vae=None, text_towers=(),
                    adapters=(Tower("controlnet", "controlnet"),))


def with_adapters(base: System, adapters: Sequence[Tower]) -> System:
    """`base` with the adapters added (a sampling run's base + ControlNets)."""
    return dataclasses.replace(base, adapters=(*base.adapters, *adapters))


def from_config(config: Mapping[str, Any]) -> System:
    """The system a checkpoint config or config file describes: its `system` section, else
    STABLE_DIFFUSION (every config and checkpoint written before the section existed)."""
    d = config.get(SYSTEM_SECTION) if hasattr(config, "get") else None
    if d is None:
        return STABLE_DIFFUSION
    return System.from_dict(d.to_dict() if hasattr(d, "to_dict") else d)


def checkpoint_config(config: Mapping[str, Any]) -> dict:
    """What a checkpoint records of a config (a ConfigDict or dict): the system's sections as
    plain JSON values, and the `system` section unless it is STABLE_DIFFUSION (so SD
    checkpoints stay as they were before the section existed)."""
    system = from_config(config)
    sections = {name: json.loads(json.dumps(section(config, name), default=list))
                for name in system.config_sections}
    if system != STABLE_DIFFUSION:
        sections[SYSTEM_SECTION] = system.to_dict()
    if _has(config, PIPELINE_SECTION):
        sections[PIPELINE_SECTION] = section(config, PIPELINE_SECTION)
    return sections


def _has(config: Mapping[str, Any], name: str) -> bool:
    return name in config and config[name] is not None


def pipeline_option(config: Mapping[str, Any], name: str, default: Any = False) -> Any:
    """A value of the config's optional `pipeline` section."""
    return section(config, PIPELINE_SECTION).get(name, default) if _has(
        config, PIPELINE_SECTION) else default


def section(config: Mapping[str, Any], name: str) -> dict:
    """A config section as a plain dict (a ConfigDict's or a JSON dict's)."""
    value = config[name]
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def tower_config(tower: Tower, config: Mapping[str, Any]):
    """The tower's frozen config dataclass, from its config section."""
    return tower.component.config_from_dict(section(config, tower.name))


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Models:
    """A system's Flax modules (by tower name) and the latent scaling. Hashable: a static
    argument of jitted functions."""

    system: System
    modules: tuple[tuple[str, Any], ...]
    scaling_factor: float
    shift_factor: float = 0.0

    def __getitem__(self, name: str):
        return dict(self.modules)[name]

    @property
    def vae(self):
        return self[self.system.vae.name]


def build(system: System, config: Mapping[str, Any], *, dtype: Any = jnp.float32,
          remat_policy: str | None = None, attention_impl: str | None = None) -> Models:
    """The modules of every tower. `remat_policy` and `attention_impl` go to the denoiser and
    the adapters."""
    modules = []
    for tower in system.towers:
        options = dict(dtype=dtype)
        if tower is system.denoiser or tower in system.adapters:
            options.update(remat_policy=remat_policy, attention_impl=attention_impl)
        tower_cfg = tower_config(tower, config)
        if getattr(tower_cfg, "force_upcast", False) and jnp.dtype(dtype) == jnp.float16:
            options["dtype"] = jnp.float32  # a VAE whose activations overflow float16
        modules.append((tower.name, tower.component.build(tower_cfg, **options)))
    vae = section(config, system.vae.name)
    return Models(system, tuple(modules), float(vae["scaling_factor"]),
                  float(vae.get("shift_factor") or 0.0))


def param_shapes(system: System, config: Mapping[str, Any],
                 names: Sequence[str] | None = None) -> dict:
    """{tower name: params as jax.ShapeDtypeStruct}: no memory, no compute."""
    towers = system.towers if names is None else [system.tower(n) for n in names]
    return {t.name: t.component.param_shapes(tower_config(t, config)) for t in towers}


def init_params(system: System, config: Mapping[str, Any], seed: int,
                names: Sequence[str] | None = None, denoiser_params: Any = None) -> dict:
    """Fresh params of the `names` towers (default all): tower i of `system.towers` from
    fold_in(key(seed), i), whichever subset is asked for. An adapter that starts from the
    denoiser (a ControlNet) starts from the denoiser's params made here, else from
    `denoiser_params` (loaded ones), else (neither) from random weights."""
    rng = jax.random.key(seed)
    wanted = system.names if names is None else tuple(names)
    params = {}
    for i, tower in enumerate(system.towers):
        if tower.name not in wanted:
            continue
        tower_cfg, key = tower_config(tower, config), jax.random.fold_in(rng, i)
        base = None if system.denoiser is None else params.get(system.denoiser.name,
                                                                denoiser_params)
        if tower in system.adapters and tower.component.starts_from_denoiser and base is not None:
            params[tower.name] = tower.component.init_from_denoiser(tower_cfg, base, key)
        else:
            params[tower.name] = tower.component.init_params(tower_cfg, key)
    return params


# ----------------------------------------------------------------------------- text


class TextInputs:
    """The tokenizers of a system's text towers as one callable: prompts -> {ids key: int32
    [N, length]}, the batch and pipeline inputs the text towers read. Every tower reads
    `prompts` unless a later prompt list is given for it: tower i (i >= 1) reads `more[i - 1]`
    (diffusers' `prompt_2` for SDXL's bigG; `prompt_3` for a third tower), None meaning
    `prompts`."""

    def __init__(self, tokenizers: Mapping[str, Any]):
        self.tokenizers = dict(tokenizers)  # ids key -> tokenizer, in tower order

    def __call__(self, prompts: str | Sequence[str],
                 *more: str | Sequence[str] | None) -> dict[str, np.ndarray]:
        while more and more[-1] is None:
            more = more[:-1]
        if len(more) >= len(self.tokenizers):
            raise ValueError(f"{len(more) + 1} prompt lists for {len(self.tokenizers)} text "
                             "tower(s)")
        per_tower = [prompts] + [p if p is not None else prompts for p in more]
        per_tower += [prompts] * (len(self.tokenizers) - len(per_tower))
        return {key: tokenizer(text) for (key, tokenizer), text in zip(self.tokenizers.items(),
                                                                         per_tower)}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.tokenizers)


def make_tokenizer(tokenizer_section: Mapping[str, Any], kind: str = "clip_text"):
    """A text tower's tokenizer from its config section: T5's SentencePiece vocabulary as the
    checkpoint holds it for a T5 tower, else CLIP BPE over the bundled vocabulary."""
    from diffusion_jax.tokenizer import CLIPTokenizer, T5Tokenizer

    if kind == "t5":
        return T5Tokenizer.from_section(tokenizer_section)
    return CLIPTokenizer.bundled(**dict(tokenizer_section))


def text_inputs(system: System, config: Mapping[str, Any],
                max_sequence_length: int | None = None) -> TextInputs:
    """The system's tokenizers; `max_sequence_length` sets the T5 towers' token count
    (diffusers' pipeline argument), else their sections' `max_length`."""
    def tokenizer_section(tower: TextTower) -> dict:
        tokenizer = section(config, tower.tokenizer)
        if max_sequence_length is not None and tower.kind == "t5":
            tokenizer["max_length"] = max_sequence_length
        return tokenizer

    return TextInputs({t.ids_key: make_tokenizer(tokenizer_section(t), t.kind)
                       for t in system.text_towers})


def _join(values: list[jax.Array]) -> jax.Array:
    return values[0] if len(values) == 1 else jnp.concatenate(values, axis=-1)


def context_groups(towers: Sequence[TextTower]) -> list[list[TextTower]]:
    """The towers giving a context, in runs joined on the feature axis; each run after the
    first starts at a tower whose context_join is "sequence"."""
    groups: list[list[TextTower]] = []
    for tower in towers:
        if not tower.context:
            continue
        if tower.context_join == "sequence" or not groups:
            groups.append([])
        groups[-1].append(tower)
    return groups


def _join_context(runs: list[list[jax.Array]]) -> jax.Array:
    """Each run side by side on the features, then the runs one after another on the tokens,
    each zero-padded on the features to the widest."""
    blocks = [_join(run) for run in runs]
    width = max(b.shape[-1] for b in blocks)
    blocks = [jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, width - b.shape[-1])]) for b in blocks]
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-2)


def encode_text(models: Models, params: Mapping[str, Any], ids: Mapping[str, jax.Array]
                ) -> dict[str, jax.Array]:
    """Token ids (by ids key) -> the conditioning: the `context` outputs of the towers that
    give one joined as their `context_join` says (`context_groups`), and the `pooled`
    outputs side by side."""
    outputs, pooled = {}, []
    for tower in models.system.text_towers:
        outputs[tower.name] = tower.component.encode_text(models[tower.name], params[tower.name],
                                                          ids[tower.ids_key])
        if tower.pooled:
            pooled.append(outputs[tower.name][tower.pooled])
    cond = {"context": _join_context([[outputs[t.name][t.context] for t in run] for run in
                                      context_groups(models.system.text_towers)])}
    if pooled:
        cond["pooled"] = _join(pooled)
    return cond


# ----------------------------------------------------------------------------- denoiser, VAE


def denoise(models: Models, params: Mapping[str, Any], x: jax.Array, t: jax.Array,
            cond: Mapping[str, jax.Array]) -> jax.Array:
    """The denoiser's prediction at x_t, t under the conditioning pytree `cond`."""
    tower = models.system.denoiser
    return tower.component.denoise(models[tower.name], params[tower.name], x, t, cond)


def encode_latents(models: Models, params: Mapping[str, Any], images: jax.Array,
                   rng: jax.Array | None = None) -> jax.Array:
    """[-1, 1] NHWC images -> latents as the denoiser sees them, (z - shift) * scale: z a
    posterior sample, or its mode when `rng` is None (deterministic img2img)."""
    tower = models.system.vae
    posterior = tower.component.encode(models[tower.name], params[tower.name], images)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return (z - models.shift_factor) * models.scaling_factor


def decode_latents(models: Models, params: Mapping[str, Any], latents: jax.Array) -> jax.Array:
    """Denoiser latents -> images NHWC, nominally [-1, 1]."""
    tower = models.system.vae
    z = latents / models.scaling_factor + models.shift_factor
    return tower.component.decode(models[tower.name], params[tower.name], z)


def time_ids_width(system: System, config: Mapping[str, Any]) -> int:
    """How many micro-conditioning numbers (`cond["time_ids"]`) the denoiser reads: 6 for
    SDXL base (original size, crop top-left, target size), 5 for the refiner (original size,
    crop top-left, aesthetic score), 0 for a denoiser without them."""
    unet = denoiser_config(system, config)
    if getattr(unet, "addition_embed_type", None) != "text_time":
        return 0
    pooled = pooled_width(system, config)
    numbers, rest = divmod(unet.projection_class_embeddings_input_dim - pooled,
                           unet.addition_time_embed_dim)
    if rest or numbers not in (5, 6):
        raise ValueError(f"{system.denoiser.name}: projection_class_embeddings_input_dim="
                         f"{unet.projection_class_embeddings_input_dim} is not {pooled} pooled "
                         f"features + 5 or 6 x addition_time_embed_dim="
                         f"{unet.addition_time_embed_dim}")
    return numbers


def time_ids(width: int, original_size: Sequence[int], crops_coords_top_left: Sequence[int],
             target_size: Sequence[int], aesthetic_score: float = 6.0) -> np.ndarray:
    """SDXL's micro-conditioning numbers, float32 [width], sizes as (height, width), the crop
    as (top, left): 6 = original size + crop + target size (base), 5 = original size + crop
    + aesthetic score (refiner), as diffusers' `_get_add_time_ids`."""
    sizes = (*original_size, *crops_coords_top_left)
    if width == 6:
        return np.asarray((*sizes, *target_size), np.float32)
    if width == 5:
        return np.asarray((*sizes, aesthetic_score), np.float32)
    raise ValueError(f"time_ids of width {width}: SDXL's U-Nets take 6 (base) or 5 (refiner)")


def time_ids_fn(system: System, config: Mapping[str, Any], image_size: int | Sequence[int],
                aesthetic_score: float = 6.0):
    """(original size, crop top-left) -> one image's `time_ids` when training at
    image_size x image_size, or at an aspect bucket's (height, width) (the target size; the
    refiner's aesthetic score); None for a denoiser without micro-conditioning. A partial of
    `time_ids`: it pickles to grain's workers."""
    width = time_ids_width(system, config)
    if not width:
        return None
    target = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return functools.partial(time_ids, width, target_size=target,
                             aesthetic_score=aesthetic_score)


def pooled_width(system: System, config: Mapping[str, Any]) -> int:
    """Features of cond["pooled"] (0: no tower gives one)."""
    return sum(tower_config(t, config).output_widths[t.pooled]
               for t in system.text_towers if t.pooled)


def context_width(system: System, config: Mapping[str, Any]) -> int:
    """Features of cond["context"]: the widest run of context outputs side by side."""
    return max(sum(tower_config(t, config).output_widths[t.context] for t in run)
               for run in context_groups(system.text_towers))


def context_length(system: System, config: Mapping[str, Any]) -> int:
    """Tokens of cond["context"]: each run's tokenizer length, the runs one after another
    (SD3: CLIP's 77 then T5's 256; Flux: T5's 512)."""
    return sum(config[run[0].tokenizer]["max_length"]
               for run in context_groups(system.text_towers))


def denoiser_config(system: System, config: Mapping[str, Any]):
    return tower_config(system.denoiser, config)


def vae_config(system: System, config: Mapping[str, Any]):
    return tower_config(system.vae, config)

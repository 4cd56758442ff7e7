"""Text-to-image, image-to-image and inpainting: one jit-compiled program per shape.

    pipe = pipeline.load("checkpoints/sd15")
    images = pipe.txt2img("a photo of a cat", negative_prompt="blurry", sampler="dpmpp_2m",
                          steps=25, guidance=7.5, seed=0, num_images=4)   # uint8 [4, H, W, 3]

A call is `prepare` on the host (validate the request; tokenize; draw the noise; only the
inputs its mode reads) and one compiled program, `generate.sample(params, inputs)`: text
encoding, the whole sampling loop (`diffusion.samplers.run`, one `lax.scan`) and the VAE
decode, cached per (shape, sampler, steps, mode). The models come from the checkpoint's
system description (`system.py`). The program runs on a ("data", "fsdp") mesh as training
does (`parallel.make_mesh`; default: every local device, data parallel): the batch split over
the mesh, params placed by `parallel.param_shardings`, so the trainer samples from the params
it holds (`params=`) without copying them. Seeds are per image: image i of a call with
`seed=s` uses seed s + i, and its starting noise and the noise of stochastic samplers depend
on that seed alone, so an image is the same whatever batch or device count it was made in.

`init_latents` replays a run of another implementation: the starting noise in the diffusers
layout [N, C, H/f, W/f], as `StableDiffusionPipeline(latents=...)` takes it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import checkpoint, generate, parallel, program_cache, system, xla_defaults
from diffusion_jax import image_files
from diffusion_jax.image_files import KARRAS_SUFFIX
# Public since before image_files.py (the notebooks and users' scripts call pipeline.save_grid):
from diffusion_jax.image_files import (a1111_sampler_name, infotext, png_metadata,  # noqa: F401
                                       save_grid, save_png)
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import flow, process

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "xla")
SAMPLER_NAMES = tuple(dict.fromkeys(samplers.SAMPLERS + samplers.FLOW_SAMPLERS)) + tuple(
    s + KARRAS_SUFFIX for s in samplers.KARRAS_SAMPLERS)
# What a generation call (and `diffusion-jax sample`) uses unless told otherwise.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE = "dpmpp_2m", 25, 7.5
# SDXL's size and crop conditioning (diffusers' argument names): sizes (height, width), crops
# (top, left); the refiner reads an aesthetic score instead of the target size.
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score",
                      "negative_original_size", "negative_crops_coords_top_left",
                      "negative_target_size", "negative_aesthetic_score")


# The most T5 tokens a prompt may take (diffusers' SD3 and Flux pipelines refuse more).
MAX_SEQUENCE_LENGTH = 512


def enable_compilation_cache(cache_dir: str | None = DEFAULT_CACHE_DIR) -> str | None:
    """Persist compiled programs across processes (`DIFFUSION_JAX_CACHE_DIR` overrides the
    default; None or "" leaves JAX's setting alone). Returns the directory set, if any."""
    cache_dir = os.environ.get("DIFFUSION_JAX_CACHE_DIR", cache_dir)
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir or None


def parse_sampler(name: str) -> tuple[str, bool]:
    """'dpmpp_2m_karras' -> ('dpmpp_2m', True). Unknown names list the valid ones."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    if name.endswith(KARRAS_SUFFIX):
        return name[: -len(KARRAS_SUFFIX)], True
    return name, False


def validate_options(*, sampler: str, steps: int, guidance_rescale: float = 0.0,
                     eta: float = 0.0, num_images: int = 1, strength: float | None = None,
                     spell=lambda option: option) -> None:
    """Checks the sampling options that need no model: the CLI calls it before loading a
    checkpoint, every generation call before compiling. `spell` names an option in the
    messages (the CLI passes one that gives its flags); `strength` is None for txt2img."""
    name, _ = parse_sampler(sampler)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{spell('steps')}={steps}: must be a positive integer")
    if num_images < 1:
        raise ValueError(f"{spell('num_images')}={num_images}: must be >= 1")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"{spell('guidance_rescale')}={guidance_rescale}: must be in [0, 1] "
                         "(0 turns it off)")
    if eta < 0 or (eta and name != "ddim"):
        raise ValueError(f"{spell('eta')}={eta}: only the ddim sampler takes eta, and it must "
                         "be >= 0")
    if strength is not None:
        if not 0 <= strength <= 1:
            raise ValueError(f"{spell('strength')}={strength}: must be in [0, 1] (0 returns "
                             "the init image, 1 replaces it)")
        if strength > 0:
            samplers.img2img_start_step(steps, strength)  # refuses one that leaves no step


def _as_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError(f"{name}: empty prompt list; pass at least one prompt")
    return prompts


def _expanded(prompt: str | Sequence[str], num_images: int, count: int | None,
              name: str) -> list[str]:
    """One prompt per image: each of the prompts `num_images` times. `count`: the images of
    the request, which one prompt (repeated) or one per prompt of the request also fits."""
    prompts = _as_list(prompt, name)
    if count is not None and len(prompts) == 1:
        return prompts * count
    if count is not None and len(prompts) * num_images != count:
        raise ValueError(f"{len(prompts)} {name}s for {count // num_images} prompts: pass one, "
                         "or one per prompt")
    return [p for p in prompts for _ in range(num_images)]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request made ready on the host: its program and plan, and only the inputs that
    program reads (see `generate`), padded to a multiple of the mesh size."""

    program: generate.Program | None  # None: strength 0, no step to run
    plan: samplers.Plan | None
    inputs: dict
    count: int  # the request's images: the first `count` rows of the output
    init_images: np.ndarray | None = None  # img2img / inpaint: what strength 0 returns


def _padded(array: np.ndarray, pad: int) -> np.ndarray:
    """Rows appended by repeating the last one (dropped from the output)."""
    return np.concatenate([array, np.repeat(array[-1:], pad, axis=0)]) if pad else array


def _on_mesh(tree: Any, shardings: Any) -> Any:
    """`tree` placed on `shardings`. Device arrays already placed so pass as they are (the
    trainer's params: no copy); host arrays, the same on every process, are cut into the
    shards each process holds."""
    def place(x, sharding):
        if isinstance(x, jax.Array):
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(
                x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree, shardings)


def control_scales(evaluations: int, scale: float, start: float, end: float) -> np.ndarray:
    """The ControlNet's scale at each model evaluation, float32 [evaluations]: `scale` where
    evaluation i of n lies within start .. end (diffusers' `controlnet_keep`), else 0."""
    i = np.arange(evaluations)
    keep = ~((i / evaluations < start) | ((i + 1) / evaluations > end))
    return (scale * keep).astype(np.float32)


class StableDiffusion:
    """A loaded text-to-image system: its models (from the checkpoint's system description),
    params placed on a mesh, schedule and tokenizers."""

    def __init__(self, params: Mapping[str, Any] | None, config: Mapping[str, Any], *,
                 dtype: Any = jnp.float32, attention_impl: str | None = None,
                 devices: Sequence[jax.Device] | None = None, mesh: Mesh | None = None,
                 fsdp_min_size: int | None = None, export_programs: bool = True,
                 source: checkpoint.Source | None = None):
        """`params`: {tower name: params}, host or device arrays, what calls sample with
        unless they pass `params=`; None: every call passes them. `mesh`: a ("data", "fsdp")
        mesh (`parallel.make_mesh`, a training run's), default data parallel over `devices`
        (default: the local ones). Params of `fsdp_min_size` or more elements are split over
        "fsdp" as `parallel.param_shardings` says (default: the training default).
        `export_programs`: keep lowered sampling programs beside the persistent compilation
        cache when one is set (`program_cache`), so later processes skip tracing them.
        `source`: the checkpoint the params were read from, if any (`load` sets it)."""
        self.config = dict(config)
        self.system = system.from_config(self.config)
        self.source = source
        self.export_programs = export_programs
        self.dtype, self.attention_impl = dtype, attention_impl
        self.models = system.build(self.system, self.config, dtype=dtype,
                                   attention_impl=attention_impl)
        self.denoiser_config = system.denoiser_config(self.system, self.config)
        self.vae_config = system.vae_config(self.system, self.config)
        self.schedule = process.from_config(self.config["schedule"])  # DDPM table or flow
        self.text_inputs = system.text_inputs(self.system, self.config)
        self.controlnet = next((t for t in self.system.adapters if t.kind == "controlnet"), None)
        mesh_config = parallel.default_mesh_config()
        self.mesh = mesh if mesh is not None else parallel.make_mesh(
            mesh_config, jax.local_devices() if devices is None else devices)
        shapes = system.param_shapes(self.system, self.config) if params is None else {
            name: params[name] for name in self.system.names}
        self.param_shardings = parallel.param_shardings(
            shapes, self.mesh, mesh_config.fsdp_min_size if fsdp_min_size is None else fsdp_min_size)
        self.params = None if params is None else self.place(params)
        self.num_compilations = 0  # traces of the sampling program: one per shape and options
        self.num_programs_loaded = 0  # programs read from the exported-program cache instead
        self._programs: dict[tuple, Any] = {}

    def place(self, params: Mapping[str, Any]) -> dict:
        """{tower name: params} on the pipeline's param shardings; arrays already there (a
        training run's, on its mesh) are used as they are."""
        return _on_mesh({name: params[name] for name in self.system.names}, self.param_shardings)

    # -- geometry ------------------------------------------------------------------------

    @property
    def vae_factor(self) -> int:
        return self.vae_config.downsampling_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the denoiser's."""
        return self.vae_factor * self.denoiser_config.downsampling

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @property
    def masked_image_input(self) -> bool:
        """An inpainting denoiser (SD's 9-channel U-Net): latents + mask + masked-image latents."""
        return self.denoiser_config.in_channels == 2 * self.latent_channels + 1

    def default_size(self) -> int:
        return self.denoiser_config.sample_size * self.vae_factor

    # -- the request, on the host ----------------------------------------------------------

    def prepare(self, mode: str, prompt: str | Sequence[str],
                negative_prompt: str | Sequence[str] = "", *, sampler: str = DEFAULT_SAMPLER,
                steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                guidance_rescale: float = 0.0,
                eta: float = 0.0, seed: int | Sequence[int] = 0, num_images: int = 1,
                height: int | None = None, width: int | None = None,
                init_latents: np.ndarray | None = None, init_image: Any = None,
                mask: Any = None, strength: float = 1.0,
                prompt_2: str | Sequence[str] | None = None,
                negative_prompt_2: str | Sequence[str] | None = None,
                prompt_3: str | Sequence[str] | None = None,
                negative_prompt_3: str | Sequence[str] | None = None,
                max_sequence_length: int | None = None,
                denoising_end: float | None = None, denoising_start: float | None = None,
                start_latents: np.ndarray | None = None, output: str = "images",
                control_image: Any = None, control_scale: float = 1.0,
                control_start: float = 0.0, control_end: float = 1.0, guess_mode: bool = False,
                true_cfg: float = 1.0, **micro_conditioning) -> Prepared:
        """Validates a request (before anything is traced or compiled) and builds the inputs
        of its program: tokens, noise, and images, masks, step noise and guidance scalars
        only where the mode, sampler and guidance read them.

        SDXL: `prompt_2` / `negative_prompt_2` for the second text tower (default: the
        first's); the micro-conditioning of `MICRO_CONDITIONING` (diffusers' names and
        defaults); `denoising_end` stops early and, with output="latents", hands the latents
        to a refiner's `prepare("img2img", ..., start_latents=, denoising_start=)`.

        SD3: `prompt_3` / `negative_prompt_3` for the third (T5) tower (default: the
        first's); `max_sequence_length`, the T5 towers' token count (default: the
        checkpoint's, diffusers' 256 for SD3).

        Flux.1: `guidance` is the distilled guidance dev embeds (schnell has none), not
        classifier-free; `true_cfg` > 1 runs classifier-free guidance against the negative
        prompt (diffusers' true_cfg_scale); `prompt_2` is T5's (max_sequence_length 512).
        A flow schedule with dynamic shifting visits FluxPipeline's sigmas, linspace(1, 1/n,
        n) shifted by the image's token count.

        ControlNet (a pipeline loaded with `controlnet=`): `control_image` (PIL image, path or
        [H, W, 3] array in [0, 1]; images are resized to the output with Lanczos, as
        diffusers' control image processor does), its residuals scaled by `control_scale`
        during the fraction `control_start` .. `control_end` of the steps (diffusers'
        control_guidance_start / _end), `guess_mode` as diffusers'."""
        if mode not in generate.MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(generate.MODES)}")
        if mode == "txt2img" and strength != 1.0:
            raise ValueError("strength applies to img2img and inpaint only")
        if output not in ("images", "latents"):
            raise ValueError(f"output={output!r}: use 'images' or 'latents'")
        validate_options(sampler=sampler, steps=steps, guidance_rescale=guidance_rescale, eta=eta,
                         num_images=num_images, strength=None if mode == "txt2img" else strength)
        self._check_control(control_image, control_scale, control_start, control_end, guess_mode)
        name, karras = parse_sampler(sampler)
        prompts = _expanded(prompt, num_images, None, "prompt")
        count = len(prompts)
        negatives = _expanded(negative_prompt, num_images, count, "negative_prompt")
        if (prompt_2 is not None or negative_prompt_2 is not None) and len(
                self.system.text_towers) < 2:
            raise ValueError("prompt_2 / negative_prompt_2: this checkpoint has one text tower; "
                             "pass prompt and negative_prompt only")
        if (prompt_3 is not None or negative_prompt_3 is not None) and len(
                self.system.text_towers) < 3:
            raise ValueError("prompt_3 / negative_prompt_3: this checkpoint has fewer than three "
                             "text towers (SD3 has three)")
        expand = lambda p, name: None if p is None else _expanded(p, num_images, count, name)
        prompts_2, negatives_2 = expand(prompt_2, "prompt_2"), expand(negative_prompt_2,
                                                                     "negative_prompt_2")
        prompts_3, negatives_3 = expand(prompt_3, "prompt_3"), expand(negative_prompt_3,
                                                                     "negative_prompt_3")
        text_inputs = self._text_inputs(max_sequence_length)
        if start_latents is not None:
            start_latents = np.asarray(start_latents, np.float32)
            if start_latents.ndim != 4:
                raise ValueError(f"start_latents has shape {start_latents.shape}; expected "
                                 "[N, H/f, W/f, C] (output='latents' of the base)")
            height = height or start_latents.shape[1] * self.vae_factor
            width = width or start_latents.shape[2] * self.vae_factor
        height = height or self.default_size()
        width = width or self.default_size()
        multiple = self.size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height x width = {height} x {width}: both must be positive "
                             f"multiples of {multiple} (VAE factor {self.vae_factor} x U-Net "
                             f"downsampling {multiple // self.vae_factor})")
        cond, negative_cond = self._micro_conditioning(height, width, count, micro_conditioning)
        seeds = [seed + i for i in range(count)] if isinstance(seed, int) else list(seed)
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} images: pass one int or one per image")
        latent_shape = (height // self.vae_factor, width // self.vae_factor, self.latent_channels)
        if init_latents is not None:
            init_latents = np.asarray(init_latents, np.float32)
            expected = (count, latent_shape[2], *latent_shape[:2])
            if init_latents.shape != expected:
                raise ValueError(f"init_latents has shape {init_latents.shape}; expected {expected} "
                                 "([N, C, H/f, W/f], the diffusers layout)")
        if (start_latents is None) != (denoising_start is None):
            raise ValueError("start_latents and denoising_start go together: the refiner "
                             "continues the base's latents from where its denoising_end stopped")
        if start_latents is not None:
            if mode != "img2img" or init_image is not None or init_latents is not None:
                raise ValueError("start_latents: continue them with mode='img2img' and no "
                                 "init_image or init_latents")
            if start_latents.shape != (count, *latent_shape):
                raise ValueError(f"start_latents has shape {start_latents.shape}; expected "
                                 f"{(count, *latent_shape)} ([N, H/f, W/f, C])")

        inputs: dict[str, Any] = {}
        init_images = None
        if mode != "txt2img" and start_latents is None:
            if init_image is None:
                raise ValueError(f"{mode} needs an init image")
            image = image_files.image_array(init_image, height, width, "init image", 3)
            init_images = inputs["init_images"] = np.repeat(image[None], count, axis=0)
        if mode == "inpaint":
            if mask is None:
                raise ValueError("inpaint needs a mask (white = repaint)")
            mask_array = image_files.image_array(mask, height, width, "mask", 1)
            repaint = (mask_array >= 0.5).astype(np.float32)
            inputs["masks"] = np.repeat(repaint[None, ..., None], count, axis=0)
        if init_images is not None and strength == 0:  # no step to run: the init image, exactly
            return Prepared(None, None, {}, count, init_images)

        if start_latents is not None:
            start_step = samplers.denoising_start_step(name, self.schedule, steps,
                                                       denoising_start, karras=karras)
        else:
            start_step = 0 if mode == "txt2img" else samplers.img2img_start_step(
                steps, strength, flow=isinstance(self.schedule, flow.FlowProcess))
        plan = samplers.make_plan(name, self.schedule, steps, eta=eta, karras=karras,
                                  start_step=start_step,
                                  **self._flow_sigmas(name, height, width, steps))
        if denoising_end is not None:
            plan = samplers.truncated(plan, denoising_end)
        guided, guidance, guidance_cond = self._guidance(guidance, true_cfg, count)
        cond, negative_cond = {**cond, **guidance_cond}, {**negative_cond, **guidance_cond}
        # SDXL base: an empty negative prompt is zeros, not the encoded "" (diffusers'
        # negative_prompt=None with force_zeros_for_empty_prompt).
        zero_negative = guided and system.pipeline_option(
            self.config, "force_zeros_for_empty_prompt") and not any(
            negatives + (negatives_2 or []) + (negatives_3 or []))
        program = generate.Program(
            mode, name, karras, float(eta), steps, start_step, guided=guided,
            noise_only_start=mode == "inpaint" and strength == 1.0,
            masked_image_input=mode == "inpaint" and self.masked_image_input,
            zero_negative_text=bool(zero_negative), start_latents=start_latents is not None,
            denoising_end=denoising_end, output_latents=output == "latents",
            guess_mode=self.controlnet is not None and (guess_mode or system.tower_config(
                self.controlnet, self.config).global_pool_conditions))
        inputs["text"] = text_inputs(prompts, prompts_2, prompts_3)
        if cond:
            inputs["cond"] = cond
        if guided:
            if not zero_negative:
                inputs["negative_text"] = text_inputs(negatives, negatives_2, negatives_3)
            if negative_cond:
                inputs["negative_cond"] = negative_cond
            inputs["guidance"] = np.asarray(guidance, np.float32)
            inputs["guidance_rescale"] = np.asarray(guidance_rescale, np.float32)
        if start_latents is not None:
            inputs["start_latents"] = start_latents
        elif init_latents is not None:
            inputs["noise"] = init_latents.transpose(0, 2, 3, 1)
        else:
            inputs["noise"] = np.stack([
                np.asarray(jax.random.normal(jax.random.key(s), latent_shape)) for s in seeds])
        if plan.stochastic:  # per image, [N, evaluations, ...]: seed-determined
            stream = 2 if start_latents is not None else 1  # a refiner's: not the base's again
            inputs["step_noise"] = np.stack([
                np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(s), stream),
                                             (plan.num_evaluations, *latent_shape)))
                for s in seeds])
        if self.controlnet is not None:
            image = image_files.control_image(control_image, height, width)
            inputs["control_image"] = np.repeat(image[None], count, axis=0)
            inputs["control_scales"] = np.tile(control_scales(
                plan.num_evaluations, control_scale, control_start, control_end), (count, 1))
        pad = (-count) % self.mesh.size  # every device gets rows
        inputs = jax.tree.map(lambda a: _padded(a, pad) if np.ndim(a) else a, inputs)
        return Prepared(program, plan, inputs, count, init_images)

    def _flow_sigmas(self, sampler: str, height: int, width: int, steps: int) -> dict:
        """make_plan's `mu` and `sigmas` on a flow schedule with dynamic shifting, as
        FluxPipeline passes them: linspace(1, 1/n, n) (to the samplers that take sigmas;
        the multistep solvers make their own), shifted by mu of the image's token count (one
        token per denoiser patch); {} on other schedules."""
        if not (isinstance(self.schedule, flow.FlowProcess)
                and self.schedule.config.use_dynamic_shifting):
            return {}
        tokens = (height // self.size_multiple) * (width // self.size_multiple)
        options = dict(mu=flow.resolution_mu(self.schedule.config, tokens))
        if sampler in samplers.CUSTOM_SIGMA_SAMPLERS:
            options["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        return options

    def _guidance(self, guidance: float, true_cfg: float,
                  count: int) -> tuple[bool, float, dict]:
        """(classifier-free guidance on, its scale, the conditioning both passes add). A
        denoiser that takes guidance as an input (Flux.1-dev) gets it as cond["guidance"];
        one whose pipeline's guidance is not classifier-free (Flux.1) is guided by
        `true_cfg` instead."""
        denoiser = system.denoiser_config(self.system, self.config)
        if getattr(denoiser, "classifier_free_guidance", True):
            if true_cfg != 1.0:
                raise ValueError("true_cfg applies to Flux.1 checkpoints (their guidance is not "
                                 "classifier-free); use guidance here")
            return guidance != 1.0, guidance, {}
        if true_cfg < 1:
            raise ValueError(f"true_cfg={true_cfg}: must be >= 1 (1: no negative pass)")
        as_input = getattr(denoiser, "guidance_input", False)
        cond = {"guidance": np.full((count,), guidance, np.float32)} if as_input else {}
        return true_cfg > 1.0, true_cfg, cond

    def _text_inputs(self, max_sequence_length: int | None) -> system.TextInputs:
        """The tokenizers, the T5 towers' at `max_sequence_length` tokens where given."""
        if max_sequence_length is None:
            return self.text_inputs
        if not any(t.kind == "t5" for t in self.system.text_towers):
            raise ValueError("max_sequence_length: this checkpoint has no T5 text tower")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length={max_sequence_length}: must be in 1.."
                             f"{MAX_SEQUENCE_LENGTH} (T5's pre-training length)")
        return system.text_inputs(self.system, self.config, max_sequence_length)

    def _check_control(self, image: Any, scale: float, start: float, end: float,
                       guess_mode: bool) -> None:
        given = (["control_image"] if image is not None else []) + [
            name for name, value, default in (
                ("control_scale", scale, 1.0), ("control_start", start, 0.0),
                ("control_end", end, 1.0), ("guess_mode", guess_mode, False))
            if value != default]
        if self.controlnet is None:
            if given:
                raise ValueError(f"{', '.join(given)}: this pipeline has no ControlNet; load "
                                 "one with pipeline.load(..., controlnet=DIR) (--controlnet)")
            return
        if image is None:
            raise ValueError("this pipeline has a ControlNet: pass its control_image "
                             "(--control-image)")
        if not 0 <= start < end <= 1:
            raise ValueError(f"control_start={start}, control_end={end}: need "
                             "0 <= start < end <= 1 (fractions of the steps)")

    def _micro_conditioning(self, height: int, width: int, count: int,
                            options: Mapping[str, Any]) -> tuple[dict, dict]:
        """SDXL's `time_ids` (cond, negative cond), [count, 5 or 6] float32 each, from the
        MICRO_CONDITIONING options. Defaults: sizes (height, width), crop (0, 0), aesthetic
        score 6; each negative number the positive one, the negative aesthetic score 2.5.
        (diffusers' SDXL pipelines differ among themselves there: txt2img reads negative
        sizes only when both are given, img2img and inpaint never read the negative crop, the
        refiner's defaults to (0, 0).) Options the denoiser does not read are refused."""
        unknown = sorted(set(options) - set(MICRO_CONDITIONING))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; micro-conditioning options: "
                            f"{', '.join(MICRO_CONDITIONING)}")
        numbers = system.time_ids_width(self.system, self.config)
        reads = {6: {"original_size", "crops_coords_top_left", "target_size"},
                 5: {"original_size", "crops_coords_top_left", "aesthetic_score"}}.get(numbers, set())
        given = {k: v for k, v in options.items() if v is not None}
        unread = sorted(k for k in given if k.replace("negative_", "") not in reads)
        if unread:
            what = (f"reads {', '.join(sorted(reads))}" if reads
                    else "takes no micro-conditioning")
            raise ValueError(f"{', '.join(unread)}: this checkpoint's {self.system.denoiser.name} "
                             f"{what}")
        if not numbers:
            return {}, {}
        for key, value in given.items():
            smallest = 0 if "crops" in key else 1
            if "score" not in key and (len(value) != 2 or any(
                    int(v) != v or v < smallest for v in value)):
                raise ValueError(f"{key}={tuple(value)}: two integers (height, width; top, left "
                                 "for a crop), sizes >= 1, crops >= 0")
        size = (height, width)
        positive = dict(original_size=given.get("original_size", size),
                        crops_coords_top_left=given.get("crops_coords_top_left", (0, 0)),
                        target_size=given.get("target_size", size),
                        aesthetic_score=given.get("aesthetic_score", 6.0))
        negative = {key: given.get("negative_" + key, positive[key]) for key in positive}
        negative["aesthetic_score"] = given.get("negative_aesthetic_score", 2.5)
        return ({"time_ids": np.tile(system.time_ids(numbers, **positive), (count, 1))},
                {"time_ids": np.tile(system.time_ids(numbers, **negative), (count, 1))})

    # -- the compiled program --------------------------------------------------------------

    def run(self, prepared: Prepared, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """The request's images, float32 [N, H, W, 3] in [0, 1], from `params` ({tower name:
        params}; default the pipeline's own). On several processes every one must call it
        (the program spans their devices), and every one gets all the images."""
        if prepared.program is None:
            return prepared.init_images
        if params is None and self.params is None:
            raise ValueError("this pipeline was built without params: pass params=")
        params = self.params if params is None else self.place(params)
        inputs = _on_mesh(prepared.inputs, generate.input_shardings(prepared.inputs, self.mesh))
        args = (params, inputs)
        out = self._program_fn(prepared, args)(*args)
        return np.asarray(out.addressable_data(0))[:prepared.count]  # replicated: whole here

    def _program_fn(self, prepared: Prepared, args: tuple):
        """The compiled sampling program of `prepared` on arguments shaped like `args`
        (params, inputs): traced here once per shape, or read from the exported-program
        cache (`program_cache`) that a previous process wrote."""
        program, inputs = prepared.program, args[1]
        key = (program, jax.tree.structure(inputs),
               tuple((x.shape, x.dtype) for x in jax.tree.leaves(inputs)))
        if key not in self._programs:
            fn = jax.jit(functools.partial(self._traced, program, prepared.plan),
                         in_shardings=(self.param_shardings,
                                       generate.input_shardings(inputs, self.mesh)),
                         out_shardings=parallel.replicated(self.mesh),
                         compiler_options=xla_defaults.compiler_options("forward"))
            description = dict(program=dataclasses.asdict(program), config=self.config,
                               dtype=jnp.dtype(self.dtype).name,
                               attention_impl=self.attention_impl, mesh=dict(self.mesh.shape))
            source = "jit"
            if self.export_programs:
                fn, source = program_cache.load_or_export(fn, args, description, mesh=self.mesh,
                                                          program_kind="forward")
            self.num_programs_loaded += source == "read"
            self._programs[key] = fn
        return self._programs[key]

    def _traced(self, program: generate.Program, plan: samplers.Plan, params, inputs):
        self.num_compilations += 1  # runs once per trace
        return generate.sample(self.models, program, plan, params, inputs)

    # -- public entry points -------------------------------------------------------------

    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                **options) -> np.ndarray:
        """Images [N, H, W, 3] for each prompt x num_images: uint8, float32 in [0, 1] with
        output_type="float32", or the latents [N, H/f, W/f, C] with output_type="latents"
        (with denoising_end: what a refiner's `refine` continues). Options: `prepare`'s
        (sampler, steps, guidance, seed, num_images, height, width, init_latents, SDXL's
        prompt_2 and micro-conditioning, SD3's prompt_3 and max_sequence_length, ...) and params= instead of the pipeline's."""
        return self._run("txt2img", prompt, negative_prompt, **options)

    def img2img(self, prompt: str | Sequence[str], init_image: Any,
                negative_prompt: str | Sequence[str] = "", *, strength: float = 0.8,
                **options) -> np.ndarray:
        """Start from `init_image` (PIL image, path or [H, W, 3] array) noised to `strength`
        (1: pure noise) and run the remaining steps. At strength 0 no step is left: the init
        image comes back as it is, not through the VAE."""
        return self._run("img2img", prompt, negative_prompt, init_image=init_image,
                         strength=strength, **options)

    def inpaint(self, prompt: str | Sequence[str], init_image: Any, mask: Any,
                negative_prompt: str | Sequence[str] = "", *, strength: float = 1.0,
                **options) -> np.ndarray:
        """Repaint where `mask` is white (>= 0.5), keep the rest of `init_image`. A 9-channel
        inpainting U-Net sees the mask; a standard one is steered by latent blending."""
        return self._run("inpaint", prompt, negative_prompt, init_image=init_image, mask=mask,
                         strength=strength, **options)

    def refine(self, prompt: str | Sequence[str], latents: np.ndarray,
               negative_prompt: str | Sequence[str] = "", *, denoising_start: float = 0.8,
               **options) -> np.ndarray:
        """SDXL's ensemble of experts: continue a base model's `latents` (its
        output_type="latents" at denoising_end=F) from `denoising_start`=F to the end of the
        same schedule (same sampler and steps), as diffusers' refiner with
        `denoising_start`."""
        return self._run("img2img", prompt, negative_prompt, start_latents=latents,
                         denoising_start=denoising_start, **options)

    def _run(self, mode: str, prompt, negative_prompt, *, output_type: str = "uint8",
             params: Mapping[str, Any] | None = None, **request) -> np.ndarray:
        if output_type not in ("uint8", "float32", "latents"):
            raise ValueError(f"output_type={output_type!r}: use 'uint8', 'float32' or 'latents'")
        output = "latents" if output_type == "latents" else "images"
        images = self.run(self.prepare(mode, prompt, negative_prompt, output=output, **request),
                          params)
        return image_files.to_uint8(images) if output_type == "uint8" else images


def load(directory: str | os.PathLike, *, step: int | None = None, use_ema: bool = True,
         dtype: Any = jnp.float32, cache_dir: str | None = DEFAULT_CACHE_DIR,
         devices: Sequence[jax.Device] | None = None, mesh: Mesh | None = None,
         vae: str | os.PathLike | None = None,
         loras: Sequence[tuple[Any, float]] = (),
         controlnet: str | os.PathLike | None = None) -> StableDiffusion:
    """The pipeline of a checkpoint (converted or trained; a training workdir or one step
    folder works too, see `checkpoint.resolve`): EMA weights where the checkpoint has them
    and `use_ema`. `pipe.source` records the checkpoint, step and EMA choice used. `vae`: a
    diffusers AutoencoderKL folder used instead of the checkpoint's VAE (e.g. SDXL's
    fp16-fix VAE), with its own scaling factor, as diffusers' `vae=` does. `dtype`: compute
    dtype (params stay float32); under float16 a VAE whose config says `force_upcast` runs
    in float32. `loras`: (file, weight) pairs, kohya / A1111 or diffusers / PEFT LoRA files
    (paths, or what `convert.lora.read` made of them) merged into the params in float32
    before anything compiles. `controlnet`: a ControlNet checkpoint (`convert` of a
    ControlNetModel folder or an original control_*.safetensors) whose residuals steer the
    U-Net."""
    cache_dir = enable_compilation_cache(cache_dir)
    params, config, source = checkpoint.load_models(directory, step, use_ema=use_ema)
    if system.from_config(config).adapter_only:
        raise ValueError(f"{directory} is a ControlNet checkpoint on its own: sample with the "
                         "base model's checkpoint and give this one as --controlnet")
    if vae is not None:
        params, config = with_vae(params, config, vae)
    if loras:
        params = with_loras(params, config, loras)
    if controlnet is not None:
        params, config = with_controlnet(params, config, controlnet, use_ema=use_ema)
    return StableDiffusion(params, config, dtype=dtype, devices=devices, mesh=mesh,
                           export_programs=cache_dir is not None, source=source)


def with_vae(params: Mapping[str, Any], config: Mapping[str, Any], vae: str | os.PathLike
             ) -> tuple[dict, dict]:
    """(params, config) with the VAE of folder `vae` in place of the system's."""
    from diffusion_jax.convert import diffusers as convert_diffusers

    name = system.from_config(config).vae.name
    vae_params, vae_config = convert_diffusers.read_vae(vae)
    channels = system.section(config, name)["latent_channels"]
    if vae_config["latent_channels"] != channels:
        raise ValueError(f"--vae {vae}: its latents have {vae_config['latent_channels']} "
                         f"channels, the checkpoint's denoiser {channels}: a VAE of another "
                         "model family")
    return {**params, name: vae_params}, {**config, name: vae_config}


def with_loras(params: Mapping[str, Any], config: Mapping[str, Any],
               loras: Sequence[tuple[Any, float]]) -> dict:
    """`params` with the LoRAs merged in, each times its weight: files, or what
    `convert.lora.read` made of them."""
    from diffusion_jax.convert import lora

    if any(isinstance(entry, (str, os.PathLike)) or len(entry) != 2 for entry in loras):
        raise ValueError(f"loras={list(loras)!r}: give (file, weight) pairs, e.g. "
                         "[('style.safetensors', 0.8)]")
    return lora.merge(params, config, [
        (source if isinstance(source, lora.LoraFile) else lora.read(source), float(weight))
        for source, weight in loras])


def with_controlnet(params: Mapping[str, Any], config: Mapping[str, Any],
                    directory: str | os.PathLike, *, use_ema: bool = True) -> tuple[dict, dict]:
    """(params, config) of the system with the ControlNet checkpoint `directory` added as
    its `controlnet` adapter, after checking it fits the denoiser."""
    base = system.from_config(config)
    cn_params, cn_config, _ = checkpoint.load_models(directory, use_ema=use_ema)
    if system.from_config(cn_config) != system.CONTROLNET:
        raise ValueError(f"--controlnet {directory}: not a ControlNet checkpoint (convert a "
                         "diffusers ControlNetModel folder or a control_*.safetensors file)")
    (tower,) = system.CONTROLNET.adapters
    ours = system.tower_config(tower, cn_config)
    unet = system.denoiser_config(base, config)
    fields = ("block_out_channels", "layers_per_block", "cross_attention_dim",
              "addition_embed_type", "projection_class_embeddings_input_dim")
    differ = [f"{f}: ControlNet {getattr(ours, f)!r}, {base.denoiser.name} {getattr(unet, f)!r}"
              for f in fields if getattr(ours, f) != getattr(unet, f)]
    if differ:
        raise ValueError(f"--controlnet {directory} does not fit this checkpoint's "
                         f"{base.denoiser.name} (a ControlNet of another model family?): "
                         + "; ".join(differ))
    sections = dict(config, **{tower.name: cn_config[tower.name]})
    sections[system.SYSTEM_SECTION] = system.with_adapters(base, (tower,)).to_dict()
    return {**params, tower.name: cn_params[tower.name]}, sections

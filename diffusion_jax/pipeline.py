"""Text-to-image, image-to-image and inpainting: one jit-compiled program per shape.

    pipe = pipeline.load("checkpoints/sd15")
    images = pipe.txt2img("a photo of a cat", negative_prompt="blurry", sampler="dpmpp_2m",
                          steps=25, guidance=7.5, seed=0, num_images=4)   # uint8 [4, H, W, 3]

Text encoding, the whole sampling loop (`diffusion.samplers.run`, one `lax.scan`) and the VAE
decode are a single compiled function, cached per (shape, sampler, steps, mode), with the batch
sharded over all local devices. Seeds are per image: image i of a call with `seed=s` uses seed
s + i, and its starting noise and the noise of stochastic samplers depend on that seed alone,
so an image is the same whatever batch or device count it was made in.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import checkpoint, program_cache
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedule import Schedule
from diffusion_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig
from diffusion_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from diffusion_jax.tokenizer import CLIPTokenizer

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax", "xla")
KARRAS_SUFFIX = "_karras"
SAMPLER_NAMES = samplers.SAMPLERS + tuple(s + KARRAS_SUFFIX for s in samplers.KARRAS_SAMPLERS)


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


@dataclasses.dataclass(frozen=True)
class _Program:
    """What fixes a compiled sampling program (besides array shapes)."""

    mode: str  # "txt2img", "img2img" or "inpaint"
    sampler: str
    karras: bool
    eta: float
    steps: int
    start_step: int
    guided: bool  # classifier-free guidance on (guidance != 1)
    noise_only_start: bool  # inpainting at strength 1 starts from pure noise, as diffusers


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def _as_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError(f"{name}: empty prompt list; pass at least one prompt")
    return prompts


def _image_array(image: Any, height: int, width: int, name: str, channels: int) -> np.ndarray:
    """A PIL image, path or array -> float32 [H, W, channels] in [0, 1]."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if channels == 1 and array.ndim == 3:
        array = array[..., 0]
    if channels == 3 and array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[:2] != (height, width):
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]} (WxH) but the output is "
                         f"{width}x{height}; resize it or pass --height/--width to match")
    return array


class StableDiffusion:
    """A loaded text-to-image system: models, params, schedule and tokenizer."""

    def __init__(self, params: Mapping[str, Any], config: Mapping[str, Any], *,
                 dtype: Any = jnp.float32, attention_impl: str | None = None,
                 devices: Sequence[jax.Device] | None = None, export_programs: bool = True,
                 source: checkpoint.Source | None = None):
        """`export_programs`: keep lowered sampling programs beside the persistent compilation
        cache when one is set (`program_cache`), so later processes skip tracing them.
        `source`: the checkpoint the params were read from, if any (`load` sets it)."""
        self.config = dict(config)
        self.source = source
        self.export_programs = export_programs
        self.dtype, self.attention_impl = dtype, attention_impl
        self.unet_config = UNetConfig.from_dict(config["unet"])
        self.vae_config = AutoencoderKLConfig.from_dict(config["vae"])
        self.text_config = CLIPTextConfig.from_dict(config["text_encoder"])
        self.unet = UNet2DConditionModel(self.unet_config, dtype=dtype, attention_impl=attention_impl)
        self.vae = AutoencoderKL(self.vae_config, dtype=dtype)
        self.text_encoder = CLIPTextModel(self.text_config, dtype=dtype)
        self.schedule = Schedule.from_config(config["schedule"])
        tokenizer_config = config.get("tokenizer", {})
        self.tokenizer = CLIPTokenizer.bundled(
            pad_token=tokenizer_config.get("pad_token", "<|endoftext|>"),
            max_length=tokenizer_config.get("max_length", 77))
        self.mesh = Mesh(np.asarray(devices or jax.local_devices()), ("batch",))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(
            {name: params[name] for name in ("unet", "vae", "text_encoder")}, replicated)
        self.num_compilations = 0  # traces of the sampling program: one per shape and options
        self.num_programs_loaded = 0  # programs read from the exported-program cache instead
        self._programs: dict[_Program, Any] = {}

    # -- geometry ------------------------------------------------------------------------

    @property
    def vae_factor(self) -> int:
        return self.vae_config.downsampling_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the U-Net's downsampling."""
        return self.vae_factor * 2 ** (len(self.unet_config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @property
    def is_inpainting_unet(self) -> bool:
        """The 9-channel inpainting U-Net: latents + mask + masked-image latents."""
        return self.unet_config.in_channels == 2 * self.latent_channels + 1

    def default_size(self) -> int:
        return self.unet_config.sample_size * self.vae_factor

    # -- the compiled program --------------------------------------------------------------

    def _program_fn(self, program: _Program, args: tuple):
        """The compiled sampling program for `program` on arguments shaped like `args` (params
        first): traced here once per shape, or read from the exported-program cache
        (`program_cache`) that a previous process wrote."""
        key = (program, tuple((a.shape, a.dtype) for a in args[1:]))
        if key not in self._programs:
            batch = NamedSharding(self.mesh, PartitionSpec("batch"))
            replicated = NamedSharding(self.mesh, PartitionSpec())
            # The plan is host-side numpy, made once per program outside any trace.
            plan = samplers.make_plan(program.sampler, self.schedule, program.steps,
                                      eta=program.eta, karras=program.karras,
                                      start_step=program.start_step)
            fn = jax.jit(
                functools.partial(self._generate, program, plan),
                in_shardings=(replicated, batch, batch, batch, batch, replicated, replicated,
                              batch, batch),
                out_shardings=batch)
            description = dict(program=dataclasses.asdict(program), config=self.config,
                               dtype=jnp.dtype(self.dtype).name,
                               attention_impl=self.attention_impl,
                               mesh=self.mesh.devices.shape)
            source = "jit"
            if self.export_programs:
                fn, source = program_cache.load_or_export(fn, args, description,
                                                              mesh=self.mesh)
            self.num_programs_loaded += source == "read"
            self._programs[key] = fn
        return self._programs[key]

    def _encode_text(self, params, ids):
        return self.text_encoder.apply({"params": params["text_encoder"]}, ids).last_hidden_state

    def _encode_image(self, params, images):
        """[-1, 1] NHWC images -> scaled latents (posterior mode: deterministic img2img)."""
        posterior = self.vae.apply({"params": params["vae"]}, images, method=AutoencoderKL.encode)
        return posterior.mode() * self.vae_config.scaling_factor

    def _generate(self, program: _Program, plan: samplers.Plan, params, ids, negative_ids, noise,
                  step_noise, guidance, guidance_rescale, init_images, masks):
        """One sampling run; every array argument is batched [B, ...] except the scalars."""
        self.num_compilations += 1  # runs once per trace
        context = self._encode_text(params, ids)
        if program.guided:
            context = jnp.concatenate([self._encode_text(params, negative_ids), context])

        extra_channels = None
        init_images = init_images * 2 - 1
        if program.mode != "txt2img":
            init_latents = self._encode_image(params, init_images)
        if program.mode == "inpaint":
            f = self.vae_factor  # nearest downsampling as torch's interpolate: pixel f*i
            latent_mask = masks[:, ::f, ::f]
            if self.is_inpainting_unet:  # masked pixels become 0 in [-1, 1], as diffusers
                masked = self._encode_image(params, init_images * (masks < 0.5))
                extra_channels = jnp.concatenate([latent_mask, masked], axis=-1)

        def model_fn(x, t):
            if extra_channels is not None:
                x = jnp.concatenate([x, extra_channels.astype(x.dtype)], axis=-1)
            if not program.guided:
                return self.unet.apply({"params": params["unet"]}, x, t, context)
            both = self.unet.apply({"params": params["unet"]}, jnp.concatenate([x, x]), t, context)
            uncond, cond = jnp.split(both, 2)
            guided = uncond + guidance * (cond - uncond)
            return _rescale_guidance(guided, cond, guidance_rescale)

        if program.mode == "txt2img" or program.noise_only_start:
            latents = samplers.initial_latents(plan, noise)
        else:
            latents = samplers.initial_latents(plan, noise, init_latents)

        step_callback = None
        if program.mode == "inpaint" and not self.is_inpainting_unet:
            def step_callback(x, step_index):  # keep the unmasked region on the init image's path
                known = samplers.noise_to_level(plan, init_latents, noise, step_index + 1)
                return latent_mask * x + (1 - latent_mask) * known

        noises = jnp.swapaxes(step_noise, 0, 1) if plan.stochastic else None  # [E, B, ...]
        latents = samplers.run(plan, model_fn, latents, noises=noises, step_callback=step_callback)
        images = self.vae.apply({"params": params["vae"]}, latents / self.vae_config.scaling_factor,
                                method=AutoencoderKL.decode)
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    # -- public entry points -------------------------------------------------------------

    def txt2img(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                sampler: str = "dpmpp_2m", steps: int = 25, guidance: float = 7.5,
                guidance_rescale: float = 0.0, eta: float = 0.0, seed: int | Sequence[int] = 0,
                num_images: int = 1, height: int | None = None, width: int | None = None,
                init_latents: np.ndarray | None = None, output_type: str = "uint8") -> np.ndarray:
        """Images [N, H, W, 3] for each prompt x num_images (uint8, or float32 in [0, 1] with
        output_type="float32")."""
        return self._run("txt2img", prompt, negative_prompt, sampler=sampler, steps=steps,
                         guidance=guidance, guidance_rescale=guidance_rescale, eta=eta, seed=seed,
                         num_images=num_images, height=height, width=width,
                         init_latents=init_latents, output_type=output_type)

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

    def _run(self, mode: str, prompt, negative_prompt, *, sampler: str = "dpmpp_2m",
             steps: int = 25, guidance: float = 7.5, guidance_rescale: float = 0.0,
             eta: float = 0.0, seed: int | Sequence[int] = 0, num_images: int = 1,
             height: int | None = None, width: int | None = None,
             init_latents: np.ndarray | None = None, init_image: Any = None, mask: Any = None,
             strength: float = 1.0, output_type: str = "uint8") -> np.ndarray:
        # Validate everything before anything is traced or compiled.
        if mode == "txt2img" and strength != 1.0:
            raise ValueError("strength applies to img2img and inpaint only")
        validate_options(sampler=sampler, steps=steps, guidance_rescale=guidance_rescale, eta=eta,
                         num_images=num_images, strength=None if mode == "txt2img" else strength)
        name, karras = parse_sampler(sampler)
        if output_type not in ("uint8", "float32"):
            raise ValueError(f"output_type={output_type!r}: use 'uint8' or 'float32'")
        prompts = _as_list(prompt, "prompt")
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = _as_list(negative_prompt, "negative_prompt") if not isinstance(
            negative_prompt, str) else [negative_prompt]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        elif len(negatives) * num_images == len(prompts):
            negatives = [n for n in negatives for _ in range(num_images)]
        else:
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts) // num_images} "
                             "prompts: pass one, or one per prompt")
        count = len(prompts)
        height = height or self.default_size()
        width = width or self.default_size()
        multiple = self.size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height x width = {height} x {width}: both must be positive "
                             f"multiples of {multiple} (VAE factor {self.vae_factor} x U-Net "
                             f"downsampling {multiple // self.vae_factor})")
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

        images = np.zeros((count, height, width, 3), np.float32)
        masks = np.zeros((count, height, width, 1), np.float32)
        if mode != "txt2img":
            if init_image is None:
                raise ValueError(f"{mode} needs an init image")
            images[:] = _image_array(init_image, height, width, "init image", 3)
        if mode == "inpaint":
            if mask is None:
                raise ValueError("inpaint needs a mask (white = repaint)")
            masks[:] = (_image_array(mask, height, width, "mask", 1) >= 0.5)[..., None]
        if mode != "txt2img" and strength == 0:  # no step to run: the init image, exactly
            return _to_uint8(images) if output_type == "uint8" else images

        start_step = 0 if mode == "txt2img" else samplers.img2img_start_step(steps, strength)
        if init_latents is not None:
            noise = init_latents.transpose(0, 2, 3, 1)
        else:
            noise = np.stack([np.asarray(jax.random.normal(jax.random.key(s), latent_shape))
                              for s in seeds])
        program = _Program(mode, name, karras, float(eta), steps, start_step,
                           guided=guidance != 1.0,
                           noise_only_start=mode == "inpaint" and strength == 1.0)
        plan = samplers.make_plan(name, self.schedule, steps, eta=eta, karras=karras,
                                  start_step=start_step)  # validates before compiling
        # Per-image noise of stochastic samplers, [N, evaluations, ...]: seed-determined.
        step_noise = np.stack([
            np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(s), 1),
                                         (plan.num_evaluations, *latent_shape)))
            for s in seeds]) if plan.stochastic else np.zeros((count, 1), np.float32)

        ids = self.tokenizer(prompts)
        negative_ids = self.tokenizer(negatives)
        # Pad the batch to a multiple of the device count; padded rows are dropped at the end.
        pad = (-count) % self.mesh.size
        padded = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a
        args = (self.params, padded(ids), padded(negative_ids), padded(noise),
                padded(step_noise), np.float32(guidance), np.float32(guidance_rescale),
                padded(images), padded(masks))
        out = self._program_fn(program, args)(*args)
        out = np.asarray(out)[:count]
        return _to_uint8(out) if output_type == "uint8" else out


def _rescale_guidance(guided: jax.Array, cond: jax.Array, rescale: jax.Array) -> jax.Array:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the guided prediction's std to the
    conditional one's, blended by `rescale` (0 leaves the prediction as it is)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


# What A1111 (and Forge, ComfyUI's A1111 importers, civitai) call our samplers.
A1111_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "pndm": "PLMS", "euler": "Euler",
                       "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                       "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM"}


def a1111_sampler_name(sampler: str) -> str:
    """'dpmpp_2m_karras' -> 'DPM++ 2M Karras', 'euler_ancestral' -> 'Euler a'."""
    name, karras = parse_sampler(sampler)
    return A1111_SAMPLER_NAMES[name] + (" Karras" if karras else "")


def infotext(run: Mapping[str, Any], seed: int) -> str:
    """A1111's `parameters` text of image `seed` of a run recorded as `diffusion-jax sample`
    records it: what "PNG Info" tools read. A1111 drops `,` and `:` from the model name,
    which would end its field."""
    model = checkpoint.display_name(run["checkpoint"]).replace(",", "").replace(":", "")
    fields = {"Steps": run["steps"], "Sampler": a1111_sampler_name(run["sampler"]),
              "CFG scale": run["guidance"], "Seed": seed, "Size": f"{run['width']}x{run['height']}",
              "Model": model, "Denoising strength": run.get("strength"),
              "Eta": run["eta"] or None, "Version": f"diffusion_jax {run['diffusion_jax_version']}"}
    settings = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {run['negative_prompt']}" if run["negative_prompt"] else ""
    return f"{run['prompt']}{negative}\n{settings}"


def png_metadata(run: Mapping[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """Text chunks of a PNG holding the images of `seeds` from `run`: the run's settings with
    those seeds, and A1111's `parameters` of the first (as A1111 labels its grids)."""
    return {**run, "seeds": list(seeds), "parameters": infotext(run, seeds[0])}


def save_png(image: np.ndarray, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """An image [H, W, 3] (uint8, or float in [0, 1]) as a PNG; `metadata` goes into its text
    chunks (str values as they are, others as JSON) so the picture says how it was made.
    `path` may be local or a gs:// URI."""
    import json

    from PIL import Image, PngImagePlugin

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = _to_uint8(np.clip(image, 0, 1))
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    with checkpoint.as_path(path).open("wb") as f:
        Image.fromarray(image).save(f, format="PNG", pnginfo=info)


def save_grid(images: np.ndarray, path: str | os.PathLike, metadata: Mapping[str, Any],
              columns: int | None = None) -> np.ndarray:
    """Images [N, H, W, 3] as one PNG grid of `columns` per row (default: up to 8), with
    `metadata` as `save_png` writes it; returns the grid [H', W', 3] as given to it."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    columns = columns or min(n, 8)
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    save_png(grid, path, metadata)
    return grid


def load(directory: str | os.PathLike, *, step: int | None = None, use_ema: bool = True,
         dtype: Any = jnp.float32, cache_dir: str | None = DEFAULT_CACHE_DIR,
         devices: Sequence[jax.Device] | None = None) -> StableDiffusion:
    """The pipeline of a checkpoint (converted or trained; a training workdir or one step
    folder works too, see `checkpoint.resolve`): EMA weights where the checkpoint has them
    and `use_ema`. `pipe.source` records the checkpoint, step and EMA choice used."""
    cache_dir = enable_compilation_cache(cache_dir)
    params, config, source = checkpoint.load_models(directory, step, use_ema=use_ema)
    return StableDiffusion(params, config, dtype=dtype, devices=devices,
                           export_programs=cache_dir is not None, source=source)

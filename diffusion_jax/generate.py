"""The sampling program: one pure function of (params, inputs) that the pipeline jit-compiles.

    fn = functools.partial(sample, models, program, plan)        # static: bound, not traced
    jitted = jax.jit(fn, in_shardings=(param_shardings, input_shardings(inputs, mesh)),
                     out_shardings=parallel.replicated(mesh))
    images = jitted(params, inputs)                               # [B, H, W, 3] in [0, 1]

`inputs` is a dict holding only what the program's mode reads (see `pipeline.prepare`):

    text, negative_text   {ids key: int32 [B, L]}: the text towers' token ids (`system.
                          text_inputs`); negative_text only with classifier-free guidance
                          and not `zero_negative_text`
    cond, negative_cond   conditioning given as it is, beside the text towers' (SDXL's
                          `time_ids` [B, 5 or 6]); negative_cond with guidance
    noise                 [B, h, w, C] starting noise, unit Gaussian
    step_noise            [B, evaluations, h, w, C]: stochastic samplers only
    guidance, guidance_rescale   float32 scalars: with guidance only
    init_images           [B, H, W, 3] in [0, 1]: img2img and inpaint
    masks                 [B, H, W, 1], 1 = repaint: inpaint
    start_latents         [B, h, w, C]: img2img continuing another model's latents (an SDXL
                          refiner after the base), taken as they are: no VAE, no noise added
    control_image         [B, H, W, 3] in [0, 1]: the ControlNet's image (a system with one)
    control_scales        [B, evaluations]: its conditioning scale at each model evaluation
                          (0 outside control_start .. control_end)

Everything model-specific goes through `system` (text encoding, denoising, the VAE), and the
conditioning is the pytree the text towers give.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from diffusion_jax import parallel, system
from diffusion_jax.diffusion import samplers

MODES = ("txt2img", "img2img", "inpaint")


@dataclasses.dataclass(frozen=True)
class Program:
    """What fixes a compiled sampling program (besides array shapes)."""

    mode: str  # one of MODES
    sampler: str
    karras: bool
    eta: float
    steps: int
    start_step: int
    guided: bool  # classifier-free guidance on (guidance != 1)
    noise_only_start: bool  # inpainting at strength 1 starts from pure noise, as diffusers
    masked_image_input: bool  # an inpainting denoiser: latents + mask + masked-image latents
    zero_negative_text: bool = False  # SDXL's empty negative prompt: all-zero text conditioning
    start_latents: bool = False  # continue given latents (the refiner of an ensemble)
    denoising_end: float | None = None  # stop there (the base of an ensemble): the plan's cut
    output_latents: bool = False  # return the latents, not decoded images
    guess_mode: bool = False  # ControlNet guess mode: residuals for the positive half only


def input_shardings(inputs: Mapping[str, Any], mesh) -> dict:
    """Per leaf: batched arrays split over the whole mesh, scalars replicated."""
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.tree.map(lambda x: batch if x.ndim else replicated, dict(inputs))


def guided_cond(negative: Mapping[str, jax.Array], cond: Mapping[str, jax.Array]) -> dict:
    """The conditioning of a doubled batch: negative rows first, then positive, every leaf."""
    return jax.tree.map(lambda n, c: jnp.concatenate([n, c]), dict(negative), dict(cond))


def sample(models: system.Models, program: Program, plan: samplers.Plan,
           params: Mapping[str, Any], inputs: Mapping[str, Any]) -> jax.Array:
    """One sampling run: text encoding, the sampler's scan and the VAE decode."""
    text_cond = system.encode_text(models, params, inputs["text"])
    cond = {**text_cond, **inputs.get("cond", {})}
    if program.guided:
        negative = (jax.tree.map(jnp.zeros_like, text_cond) if program.zero_negative_text
                    else system.encode_text(models, params, inputs["negative_text"]))
        cond = guided_cond({**negative, **inputs.get("negative_cond", {})}, cond)
    noise = inputs.get("noise")  # none when continuing given latents

    extra_channels = None
    if program.mode != "txt2img" and not program.start_latents:
        init_images = inputs["init_images"] * 2 - 1
        init_latents = system.encode_latents(models, params, init_images)  # posterior mode
    if program.mode == "inpaint":
        masks = inputs["masks"]
        f = masks.shape[1] // noise.shape[1]  # nearest downsampling as torch's: pixel f*i
        latent_mask = masks[:, ::f, ::f]
        if program.masked_image_input:  # masked pixels become 0 in [-1, 1], as diffusers
            masked = system.encode_latents(models, params, init_images * (masks < 0.5))
            extra_channels = jnp.concatenate([latent_mask, masked], axis=-1)

    def model_fn(x, t, control_scale=None):
        step_cond = cond
        if control_scale is not None:  # the ControlNet reads the latents without extra channels
            step_cond = {**cond, **control_residuals(models, program, params, cond,
                                                     inputs["control_image"], x, t, control_scale)}
        if extra_channels is not None:
            x = jnp.concatenate([x, extra_channels.astype(x.dtype)], axis=-1)
        if not program.guided:
            return system.denoise(models, params, x, t, step_cond)
        both = system.denoise(models, params, jnp.concatenate([x, x]), t, step_cond)
        uncond, positive = jnp.split(both, 2)
        guided = uncond + inputs["guidance"] * (positive - uncond)
        return rescale_guidance(guided, positive, inputs["guidance_rescale"])

    if program.start_latents:
        latents = inputs["start_latents"]
    elif program.mode == "txt2img" or program.noise_only_start:
        latents = samplers.initial_latents(plan, noise)
    else:
        latents = samplers.initial_latents(plan, noise, init_latents)

    def keep_known(x, step_index):  # keep the unmasked region on the init image's path
        known = samplers.noise_to_level(plan, init_latents, noise, step_index + 1)
        return latent_mask * x + (1 - latent_mask) * known

    blends = program.mode == "inpaint" and not program.masked_image_input
    step_callback = keep_known if blends else None

    noises = jnp.swapaxes(inputs["step_noise"], 0, 1) if plan.stochastic else None  # [E, B, ...]
    control_scales = inputs["control_scales"].T if "control_image" in inputs else None  # [E, B]
    latents = samplers.run(plan, model_fn, latents, noises=noises, step_callback=step_callback,
                           evaluation_inputs=control_scales)
    if program.output_latents:
        return latents
    images = system.decode_latents(models, params, latents).astype(jnp.float32)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def control_residuals(models: system.Models, program: Program, params: Mapping[str, Any],
                      cond: Mapping[str, jax.Array], image: jax.Array, x: jax.Array,
                      t: jax.Array, scale: jax.Array) -> dict:
    """The system's ControlNet's residuals for the denoiser's batch (doubled under guidance,
    negative rows first), as diffusers' ControlNet pipelines compute them: on both halves, or
    in guess mode on the positive half only, with zeros for the negative one."""
    (tower,) = models.system.adapters
    def residuals(x, cond, image, scale):
        return tower.component.control(models[tower.name], params[tower.name], x, t, cond,
                                       image, scale, program.guess_mode)
    if not program.guided:
        return residuals(x, cond, image, scale)
    if program.guess_mode:
        positive = jax.tree.map(lambda a: jnp.split(a, 2)[1], dict(cond))
        out = residuals(x, positive, image, scale)
        return jax.tree.map(lambda r: jnp.concatenate([jnp.zeros_like(r), r]), out)
    twice = lambda a: jnp.concatenate([a, a])
    return residuals(twice(x), cond, twice(image), twice(scale))


def rescale_guidance(guided: jax.Array, cond: jax.Array, rescale: jax.Array) -> jax.Array:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the guided prediction's std to the
    conditional one's, blended by `rescale` (0 leaves the prediction as it is)."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided

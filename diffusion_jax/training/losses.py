"""The two training objectives as pure functions of (trained params, frozen params, batch,
rng): the two parts of the one params tree {tower: params} that `partition.split` makes.

Stage 1, VAE: per-pixel reconstruction (L1 or L2) of a posterior sample plus a KL term, the
LDM recipe with the loss normalised per pixel. Stage 2, latent diffusion: encode with the
frozen VAE, noise the scaled latents at a random timestep and regress the denoiser's output
on the schedule's target (epsilon / v / x0), optionally min-SNR-gamma weighted. The models
are a `system.Models`: the loss iterates the system's towers, it names none of them. A
system with a ControlNet adds its residuals to the conditioning pytree, as sampling does.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from diffusion_jax import system
from diffusion_jax.adapters import dreambooth
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.process import min_snr_weight  # noqa: F401 (the loss's weighting)
from diffusion_jax.training import partition

Params = Mapping[str, Any]
LossFn = Callable[[Params, Params, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


def _mean_per_example(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vae_loss_fn(models: system.Models, reconstruction_loss: str, kl_weight: float) -> LossFn:
    """loss = mean_pixels(|x - D(z)|^p) + kl_weight * KL(q(z|x) || N(0, I)) / latent size,
    z ~ q(z|x), with the system's VAE. LDM sums both over elements; dividing by element
    counts keeps the scale independent of the resolution."""
    if reconstruction_loss not in ("l1", "l2"):
        raise ValueError(f"reconstruction_loss {reconstruction_loss!r} is not supported; "
                         "use 'l1' or 'l2'")
    power = 1 if reconstruction_loss == "l1" else 2

    tower = models.system.vae

    def loss_fn(params, frozen, batch, rng):
        vae = partition.combine(frozen, params)[tower.name]
        x = batch["image"]
        posterior = tower.component.encode(models.vae, vae, x)
        z = posterior.sample(rng)
        reconstruction = tower.component.decode(models.vae, vae, z)
        rec = jnp.mean(jnp.abs(reconstruction - x) ** power)
        kl = jnp.mean(posterior.kl()) / z[0].size
        return rec + kl_weight * kl, {"reconstruction": rec, "kl": kl}

    return loss_fn


def precomputed_cond(models: system.Models, params: Params, batch: Mapping[str, jax.Array]
                     ) -> dict[str, jax.Array] | None:
    """The batch's precomputed text conditioning (precomputed latents carry `context`, and
    `pooled` where a tower gives one), where the loss may use it: the batch holds every key
    the text towers give and no text tower is trained (a trained one must see its own
    forward). None: encode the ids."""
    trained_text = any(name in params for name in models.system.text_names)
    keys = models.system.cond_keys
    if trained_text or not all(key in batch for key in keys):
        return None
    return {key: batch[key] for key in keys}


def batch_cond(models: system.Models, towers: Params, params: Params,
               batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The denoiser's conditioning of a batch: the text towers' (`context`, `pooled`;
    precomputed or encoded from the ids by `towers`, the whole params tree) and SDXL's
    micro-conditioning `time_ids` [B, 5 or 6], which the data pipeline builds per image."""
    cond = precomputed_cond(models, params, batch)
    if cond is None:
        cond = system.encode_text(models, towers,
                                  {key: batch[key] for key in models.system.ids_keys})
    if "time_ids" in batch:
        cond["time_ids"] = batch["time_ids"]
    return cond


def control_cond(models: system.Models, towers: Params, x_t: jax.Array, t: jax.Array,
                 cond: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict:
    """The residuals of the system's ControlNet, if it has one, at x_t, t from the batch's
    `condition` images ([B, H, W, 3] in [0, 1], made by data/conditions.py), at scale 1 as
    diffusers' ControlNet training does; {} without a ControlNet."""
    controlnets = [a for a in models.system.adapters if a.kind == "controlnet"]
    if not controlnets:
        return {}
    (tower,) = controlnets
    return tower.component.control(models[tower.name], towers[tower.name], x_t, t, cond,
                                   batch["condition"], 1.0)


def diffusion_loss_fn(models: system.Models, noise_process: process.NoiseProcess, *,
                      min_snr_gamma: float = 0.0, offset_noise: float = 0.0,
                      prior_loss_weight: float = 0.0, embedded_guidance: float = 3.5) -> LossFn:
    """Batches hold `image` (or precomputed `latents`), the text towers' ids (`input_ids`,
    ...), maybe their precomputed conditioning (`context`, `pooled`, used when the text
    towers are frozen), SDXL's `time_ids` (see `batch_cond`) and, for a system with a
    ControlNet, its `condition` images and, for DreamBooth's prior preservation, the
    `prior` flag of its class rows (their mean loss weighs `prior_loss_weight`; see
    adapters/dreambooth.py); `params` holds the trained towers (the denoiser, maybe text
    towers, or a ControlNet alone), `frozen` the others. A denoiser that takes its guidance
    as an input (Flux.1-dev) is given `embedded_guidance` for every row."""
    denoiser = models[models.system.denoiser.name].config
    guidance_input = getattr(denoiser, "guidance_input", False)

    def loss_fn(params, frozen, batch, rng):
        towers = partition.combine(frozen, params)
        rng_latent, rng_t, rng_noise, rng_offset = jax.random.split(rng, 4)
        if "latents" in batch:
            x0 = batch["latents"]
        else:
            x0 = system.encode_latents(models, towers, batch["image"], rng_latent)
        cond = batch_cond(models, towers, params, batch)
        b = x0.shape[0]
        if guidance_input:
            cond = {**cond, "guidance": jnp.full((b,), embedded_guidance, jnp.float32)}
        t = process.sample_time(noise_process, rng_t, (b,))
        noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
        if offset_noise:  # Guttenberg 2023: lets the model shift a whole channel's mean
            noise = noise + offset_noise * jax.random.normal(
                rng_offset, (b, 1, 1, x0.shape[-1]), x0.dtype)
        x_t = process.add_noise(noise_process, x0, noise, t)
        target = process.training_target(noise_process, x0, noise, t)
        model_t = process.model_time(noise_process, t)
        cond = {**cond, **control_cond(models, towers, x_t, model_t, cond, batch)}
        prediction = system.denoise(models, towers, x_t, model_t, cond)
        per_example = _mean_per_example(jnp.square(prediction.astype(jnp.float32) - target))
        mse = jnp.mean(per_example)
        weighted = per_example * process.loss_weight(noise_process, t)
        if min_snr_gamma:
            weighted = weighted * min_snr_weight(process.snr(noise_process, t),
                                                    min_snr_gamma, noise_process.prediction_type)
        if dreambooth.PRIOR_KEY in batch:
            loss, metrics = dreambooth.prior_loss(weighted, per_example,
                                                  batch[dreambooth.PRIOR_KEY], prior_loss_weight)
            return loss, {"mse": mse, **metrics}
        return jnp.mean(weighted), {"mse": mse}

    return loss_fn

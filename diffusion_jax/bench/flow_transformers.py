"""The flow transformers' forward and training step: Flux.1's (`FluxTransformer2DModel`) and
SD3's MMDiT (`SD3Transformer2DModel`), as their pipelines call them at one step, against
diffusers' models holding the same random weights.

Ours runs the system's denoiser call (`system.denoise`: NHWC latents, model time 1000 sigma,
the conditioning pytree; Flux packs 2x2 patches and builds its RoPE ids inside); the
reference gets what the diffusers pipeline would pass (NCHW latents, packed ones and ids for
Flux, the timestep scale of each).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import system
from diffusion_jax.bench import measure
from diffusion_jax.bench.models import (LEARNING_RATE, TEXT_TOKENS, WEIGHT_DECAY, _nchw, _result,
                                        _torch_figures, _torch_model, _torch_warm_median,
                                        adamw_steps_timed, torch_adamw_steps)
from diffusion_jax.bench.weights import random_params

SIGMA = 0.5  # mid-trajectory: every modulation path sees a non-trivial time
GUIDANCE = 3.5  # Flux.1-dev's default distilled guidance
# Flux's config.json has no sample_size: its latents here are 32x32 (a 256 px image, 256
# packed tokens) unless the config's section names one.
FLUX_LATENT_SIDE = 32
REFERENCE = {"flux": "FluxTransformer2DModel", "mmdit": "SD3Transformer2DModel"}


def _inputs(kind: str, cfg, section: Mapping[str, Any],
            batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(NHWC latents at the section's sample size, the conditioning pytree) of one step."""
    rng = np.random.default_rng(0)
    channels = cfg.in_channels // 4 if kind == "flux" else cfg.in_channels
    side = dict(section).get("sample_size", FLUX_LATENT_SIDE)
    latents = rng.standard_normal((batch, side, side, channels)).astype(np.float32)
    cond = {"context": rng.standard_normal((batch, TEXT_TOKENS, cfg.joint_attention_dim)
                                           ).astype(np.float32),
            "pooled": rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32)}
    if kind == "flux" and cfg.guidance_embeds:
        cond["guidance"] = np.full((batch,), GUIDANCE, np.float32)
    return latents, cond


def is_flow_transformer(config: Mapping[str, Any]) -> bool:
    return system.from_config(config).denoiser.kind in REFERENCE


def _setup(config: Mapping[str, Any], dtype: str, batch: int):
    """(denoiser tower, its config, the Linen module, random params, latents, cond)."""
    tower = system.from_config(config).denoiser
    if tower.kind not in REFERENCE:
        raise ValueError(f"bench transformer times a flow transformer (Flux.1, SD3); this "
                         f"config's denoiser is a {tower.kind}: use bench unet")
    cfg = system.tower_config(tower, config)
    model = tower.component.build(cfg, dtype=measure.DTYPES[dtype])
    params = random_params(tower.kind, config[tower.name], seed=0)
    return (tower, cfg, model, params, *_inputs(tower.kind, cfg, config[tower.name], batch))


def bench_transformer(config: Mapping[str, Any], *, batch: int = 2, dtype: str = "float32",
                      repeats: int = 5, compare_torch: bool = False) -> dict:
    """The system's flow transformer forward on [batch, side, side, C] latents at sigma 0.5,
    a 77-token text context and the pooled embedding (and Flux.1-dev's guidance)."""
    tower, cfg, model, params, latents, cond = _setup(config, dtype, batch)
    component = tower.component
    t = np.full((batch,), SIGMA * 1000, np.float32)
    forward = lambda p, x, t, cond: component.denoise(model, p, x, t, cond)
    args = jax.device_put((params, latents, t, cond))
    compiled = measure.compile_timed(forward, *args, program_kind="forward")
    ours, median_s = measure.warm_median(lambda: compiled.executable(*args), repeats)
    result = _result("transformer", batch=batch, dtype=dtype, repeats=repeats,
                     compiled=compiled, median_s=median_s, denoiser=tower.kind,
                     latent_shape=list(latents.shape),
                     image_tokens=(latents.shape[1] // 2) * (latents.shape[2] // 2))
    if compare_torch:
        module = _torch_model(REFERENCE[tower.kind], cfg, params, buffers=component.torch_ignore)
        run = _torch_call(tower.kind, module, latents, cond, dtype)
        reference, torch_s = _torch_warm_median(lambda: run().numpy(), repeats, grad=False)
        result.update(_torch_figures(batch, median_s, torch_s))
        result.update(measure.output_difference(ours, reference))
    return result


def _torch_call(kind: str, module, latents: np.ndarray, cond: dict, dtype: str):
    """A function of no arguments: the diffusers model's forward as its pipeline calls it at
    sigma 0.5, returning a float32 NHWC torch tensor."""
    import diffusers
    import torch

    from diffusion_jax.bench.models import _autocast

    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    b, h, w, c = latents.shape
    context, pooled = tensor(cond["context"]), tensor(cond["pooled"])
    if kind == "mmdit":
        timestep = torch.full((b,), SIGMA * 1000)

        def run():
            with _autocast(dtype):
                out = module(tensor(_nchw(latents)), context, pooled, timestep).sample
            return out.float().permute(0, 2, 3, 1)

        return run
    pipe = diffusers.FluxPipeline
    packed = pipe._pack_latents(tensor(_nchw(latents)), b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(context.shape[1], 3)
    guidance = tensor(cond["guidance"]) if "guidance" in cond else None
    timestep = torch.full((b,), SIGMA)  # FluxPipeline passes sigma (timestep / 1000)

    def run():
        with _autocast(dtype):
            out = module(packed, context, pooled, timestep, img_ids, txt_ids, guidance).sample
        # FluxPipeline's unpacking at vae_scale_factor 1 (h, w are the latent sides)
        return pipe._unpack_latents(out.float(), h * 8, w * 8, 8).permute(0, 2, 3, 1)

    return run


def bench_train(config: Mapping[str, Any], *, batch: int = 2, dtype: str = "float32",
                repeats: int = 5, compare_torch: bool = False) -> dict:
    """One flow-transformer training step (`bench train` on a Flux.1 or SD3 config): the
    forward at x_t = (1 - sigma) x0 + sigma eps with sigma 0.5, the MSE against the velocity
    target eps - x0, gradients and AdamW, through the project's `make_train_step` with the
    state donated; the reference: the diffusers model and torch's AdamW."""
    tower, cfg, model, params, x0, cond = _setup(config, dtype, batch)
    component = tower.component
    noise = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
    arrays = dict(noisy_latents=(1 - SIGMA) * x0 + SIGMA * noise, target=noise - x0,
                  timesteps=np.full((batch,), SIGMA * 1000, np.float32), cond=cond)

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng
        prediction = component.denoise(model, params, batch["noisy_latents"],
                                       batch["timesteps"], batch["cond"])
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - batch["target"])), {}

    compiled, median_s, losses, state_shapes = adamw_steps_timed(
        loss_fn, lambda: params, component.param_shapes(cfg), {}, jax.device_put(arrays),
        repeats)
    result = _result("train", batch=batch, dtype=dtype, repeats=repeats, compiled=compiled,
                     median_s=median_s, denoiser=tower.kind, latent_shape=list(x0.shape),
                     trained_params=sum(x.size for x in jax.tree.leaves(state_shapes.params)),
                     first_loss=losses[0], last_loss=losses[1])
    if compare_torch:
        import torch

        # our params were donated: the reference draws the same ones again
        params = random_params(tower.kind, config[tower.name], seed=0)
        module = _torch_model(REFERENCE[tower.kind], cfg, params,
                              buffers=component.torch_ignore).train()
        run = _torch_call(tower.kind, module, arrays["noisy_latents"], cond, dtype)
        target = torch.from_numpy(arrays["target"])
        torch_optimizer = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE,
                                            weight_decay=WEIGHT_DECAY)
        result.update(torch_adamw_steps(run, target, torch_optimizer, repeats, batch, median_s,
                                        losses))
    return result

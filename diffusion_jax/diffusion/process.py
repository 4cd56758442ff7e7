"""The noise process as pure functions: x_t = alpha(t) x_0 + sigma(t) eps (google-research/vdm).

A noise process is a pytree (`jax.tree_util.register_dataclass`, its configuration as static
metadata) with a static `prediction_type`, for which three functions are registered:

    sample_time(process, rng, batch_shape) -> t     the times the training loss draws
    alpha_sigma(process, t) -> (alpha, sigma)       the marginal q(x_t | x_0) at any t it defines
    model_time(process, t) -> timestep              what the denoiser is fed as its timestep

and, optionally, `snr(process, t)` where alpha^2 / sigma^2 is not the best way to compute it
and `loss_weight(process, t)`, the training loss's weighting over time (1 by default).
Everything else (`add_noise`, `training_target`, `snr`, `min_snr_weight`, the conversions
between a prediction and (x_0, eps)) is written once here over those, and nothing assumes
alpha^2 + sigma^2 = 1. The registrations are `functools.singledispatch` on the process's class,
so a new process is new code beside this module, not a branch in it.

The DDPM table (`schedule.Schedule`: integer t in [0, T), alpha = sqrt(abar_t), sigma =
sqrt(1 - abar_t), the model fed t itself) is one implementation; `from_config` builds the one a
config section names.

The rectified flow of SD3 and Flux (`flow.FlowProcess`) is the other: `prediction_type =
"flow"`, `alpha_sigma` -> (1 - t, t) for float t in [0, 1], `sample_time` -> its shifted
logit-normal (or uniform, or mode) training times, `model_time` -> t * 1000. `add_noise`,
`training_target` (the velocity eps - x_0), `snr`, `min_snr_weight` and
`prediction_to_x0_eps` apply to it unchanged, and `from_config` returns it for a FlowMatch
scheduler config. Its samplers (`flow_euler`, `flow_heun`, and `dpmpp_2m` / `unipc` on flow
sigmas) are plans over its sigmas, as the DDPM samplers are plans over the table.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


class NoiseProcess(Protocol):
    """What every process carries besides its registered functions."""

    prediction_type: str  # static: one of PREDICTION_TYPES


def _not_registered(name: str, process: Any) -> NotImplementedError:
    return NotImplementedError(f"{name} is not registered for {type(process).__name__}: "
                               f"register it with process.{name}.register.")


@functools.singledispatch
def sample_time(process: NoiseProcess, rng: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    """Training times drawn for a batch, shape `batch_shape`."""
    raise _not_registered("sample_time", process)


@functools.singledispatch
def alpha_sigma(process: NoiseProcess, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) of x_t = alpha x_0 + sigma eps, each of t's shape."""
    raise _not_registered("alpha_sigma", process)


@functools.singledispatch
def model_time(process: NoiseProcess, t: jax.Array) -> jax.Array:
    """The timestep the denoiser is conditioned on at time t."""
    raise _not_registered("model_time", process)


@functools.singledispatch
def snr(process: NoiseProcess, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha(t)^2 / sigma(t)^2."""
    alpha, sigma = alpha_sigma(process, t)
    return jnp.square(alpha) / jnp.square(sigma)


@functools.singledispatch
def loss_weight(process: NoiseProcess, t: jax.Array) -> jax.Array:
    """Per-example weights of the training loss at times t (1 unless a process's config
    chooses another weighting; min-SNR is the loss's own option)."""
    return jnp.ones_like(jnp.asarray(t, jnp.float32))


def per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcast per-example scalars [B...] against samples [B..., *sample_shape]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _unsupported_prediction(prediction_type: str) -> ValueError:
    return ValueError(f"prediction_type={prediction_type!r} is not supported; supported: "
                      f"{list(PREDICTION_TYPES)}.")


def x0_eps_to_prediction(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array,
                         prediction_type: str) -> jax.Array:
    """What a network of `prediction_type` should output at x_t = alpha x0 + sigma eps: eps,
    v = alpha eps - sigma x0 (Salimans & Ho 2022), x0, or the flow velocity eps - x0
    (d x_t / dt of x_t = (1 - t) x0 + t eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise _unsupported_prediction(prediction_type)


def prediction_to_x0_eps(prediction: jax.Array, x_t: jax.Array, alpha: jax.Array,
                         sigma: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Invert `x0_eps_to_prediction` at x_t = alpha x0 + sigma eps: returns (x0, eps).

    v and flow solve a 2x2 system whose determinant, alpha^2 + sigma^2 resp. alpha + sigma,
    never vanishes, so both stay finite at alpha = 0 (zero terminal SNR) and at sigma = 0. On
    a variance-preserving process v's determinant is 1 (`schedule.prediction_to_x0_eps`
    drops the division); on x_t = (1 - t) x0 + t eps the flow's is."""
    if prediction_type == "epsilon":
        return (x_t - sigma * prediction) / alpha, prediction
    if prediction_type == "v_prediction":
        norm = jnp.square(alpha) + jnp.square(sigma)
        return (alpha * x_t - sigma * prediction) / norm, (alpha * prediction + sigma * x_t) / norm
    if prediction_type == "sample":
        return prediction, (x_t - alpha * prediction) / sigma
    if prediction_type == "flow":
        norm = alpha + sigma
        return (x_t - sigma * prediction) / norm, (x_t + alpha * prediction) / norm
    raise _unsupported_prediction(prediction_type)


def add_noise(process: NoiseProcess, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with the given noise."""
    alpha, sigma = alpha_sigma(process, t)
    return per_example(alpha, x0) * x0 + per_example(sigma, x0) * noise


def training_target(process: NoiseProcess, x0: jax.Array, noise: jax.Array,
                    t: jax.Array) -> jax.Array:
    """The regression target of the denoising loss for `process.prediction_type`."""
    alpha, sigma = alpha_sigma(process, t)
    return x0_eps_to_prediction(x0, noise, per_example(alpha, x0), per_example(sigma, x0),
                                process.prediction_type)


def min_snr_weight(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma (Hang et al. 2023) as a weight on the MSE of each prediction type: the
    x0-space weight min(SNR, gamma) times |d x0 / d prediction|^2, the factor by which an
    error in the prediction is an error in x0. epsilon: 1 / SNR; v (variance-preserving):
    sigma^2 = 1 / (SNR + 1); flow (alpha + sigma = 1): sigma^2 = 1 / (1 + sqrt(SNR))^2."""
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "flow":
        return clipped / jnp.square(1.0 + jnp.sqrt(snr))
    raise _unsupported_prediction(prediction_type)


def from_config(section: Mapping[str, Any]) -> NoiseProcess:
    """The noise process a config's `schedule` section (diffusers scheduler keys) describes:
    a rectified flow (`flow.FlowProcess`) for a FlowMatch scheduler config, else the DDPM
    table. A DDPM scheduler with `use_flow_sigmas=True` is refused in one line."""
    # Both implementations import this module for the registrations: imported on first use.
    from diffusion_jax.diffusion import flow, schedule
    if flow.is_flow_config(section):
        return flow.FlowProcess.from_config(section)
    return schedule.Schedule.from_config(section)

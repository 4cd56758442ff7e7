"""The DDPM noise table: the discrete-time implementation of the noise process (`process`).

Notation (diffusers' / DDPM's): timesteps t = 0 .. T-1 with noise rates `betas`,
abar_t = prod_{s<=t} (1 - beta_s) (`alphas_cumprod`), and

    x_t = alpha_t x_0 + sigma_t eps,   alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t).

The k-diffusion samplers use the variance-exploding view of the same process,
x_t / alpha_t = x_0 + s_t eps with s_t = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t)
(`Schedule.sigmas`). A network predicts one of (`prediction_type`): the noise eps
("epsilon"), the velocity v = alpha_t eps - sigma_t x_0 ("v_prediction"), or x_0 ("sample").

`ScheduleConfig` uses the diffusers scheduler config keys, so a `scheduler_config.json` and
the `schedule` section of `configs/sd15.py` both load with `Schedule.from_config(d)`. The
`Schedule` carries `betas` and `alphas_cumprod` as float32 arrays (computed in float64 on the
host from float32 betas, as diffusers defines them) and its config as static metadata: it can
be passed through `jax.jit` and `jax.vmap`. It registers the `process` functions: training
times are integers uniform in [0, T) (`jax.random.randint`), the model is fed t itself, and
the SNR is read from the table. `add_noise`, `training_target` and `x0_eps_to_prediction`
here are `process`'s; every function is pure, `t` an integer array broadcast against the
leading (batch) axes of the samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process
# The table's callers import these from here; they are the process's own functions.
from diffusion_jax.diffusion.process import (add_noise, per_example, training_target,  # noqa: F401
                                             x0_eps_to_prediction)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers replaces abar_T = 0 of a zero-terminal-SNR schedule by this in its sigma-space
# schedulers, so that the largest sigma stays finite (4096).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

# Keys of diffusers scheduler configs that choose *how to sample* (solver order, Karras
# sigmas, ...). Here a sampler and its options are chosen per call (`samplers.sample`), so
# these keys do not belong to the schedule; the same holds for the parameters of features that
# `_FIXED_KEYS` keeps off.
_SAMPLER_KEYS = frozenset({
    "skip_prk_steps", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "use_lu_lambdas", "solver_order", "algorithm_type", "solver_type", "lower_order_final",
    "euler_at_final", "predict_x0", "disable_corrector", "solver_p", "final_sigmas_type",
    "interpolation_type", "timestep_type", "original_inference_steps", "timestep_scaling",
    "lambda_min_clipped", "sigma_min", "sigma_max", "clip_sample_range",
    "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type",
    "shift_terminal",
})
# Options that change the math, with the values implemented here (those of every SD config).
_FIXED_KEYS = {
    "clip_sample": (False,),  # x0 clipping is for pixel-space models
    "thresholding": (False,),
    "variance_type": (None, "fixed_small"),  # learned variances need extra model outputs
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
}


def _unsupported(key: str, value: Any, supported: Any) -> ValueError:
    return ValueError(f"scheduler config: {key}={value!r} is not supported; supported: {supported}.")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """diffusers scheduler config. Defaults: DDPMScheduler's, and `set_alpha_to_one=False` as
    in every SD scheduler config (DDIM: the abar used after the last step; PNDM likewise)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False

    def __post_init__(self):
        for key, valid in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                           ("timestep_spacing", TIMESTEP_SPACINGS)):
            if getattr(self, key) not in valid:
                raise _unsupported(key, getattr(self, key), list(valid))
        if self.num_train_timesteps < 2:
            raise _unsupported("num_train_timesteps", self.num_train_timesteps, "an integer >= 2")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"scheduler config: trained_betas has {len(self.trained_betas)} "
                             f"values, num_train_timesteps is {self.num_train_timesteps}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleConfig":
        """From a diffusers `scheduler_config.json` dict or a config section with its keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in _FIXED_KEYS:
                if value not in _FIXED_KEYS[key]:
                    raise _unsupported(key, value, list(_FIXED_KEYS[key]))
            elif key in fields:
                if key == "trained_betas" and value is not None:
                    value = tuple(float(b) for b in np.asarray(value).ravel())
                kwargs[key] = value
            elif key not in _SAMPLER_KEYS and not key.startswith("_"):
                raise ValueError(f"scheduler config: unknown key {key!r}; supported keys: "
                                 f"{sorted(fields | _SAMPLER_KEYS | set(_FIXED_KEYS))}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["trained_betas"] = None if self.trained_betas is None else list(self.trained_betas)
        return d


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2 (Nichol & Dhariwal 2021): abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)])


def make_betas(config: ScheduleConfig) -> np.ndarray:
    """The training betas, float64 holding the float32 values diffusers uses."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":  # linear in sqrt(beta): Stable Diffusion
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    else:
        betas = _cosine_betas(n)
    betas = betas.astype(np.float32).astype(np.float64)
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so that abar_0 is kept and
    abar_{T-1} = 0 (the last step is pure noise, as it is at sampling time)."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    abar = ((sqrt_abar - last) * first / (first - last)) ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    """abar_t as float32, accumulated in float64 (diffusers' float32 cumprod drifts ~1e-6)."""
    return np.cumprod(1.0 - make_betas(config)).astype(np.float32)


def make_sigmas(config: ScheduleConfig) -> np.ndarray:
    """k-diffusion sigma_t = sqrt((1 - abar_t) / abar_t), float32 like diffusers', ascending
    in t. A zero-terminal-SNR schedule's infinite last sigma is made finite as diffusers does."""
    abar = make_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        abar[-1] = ZERO_SNR_ALPHA_CUMPROD
    return np.sqrt((1 - abar) / abar)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["betas", "alphas_cumprod"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class Schedule:
    """The training noise schedule: float32 `betas` and `alphas_cumprod`, [T] each."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    config: ScheduleConfig

    @classmethod
    def from_config(cls, config: ScheduleConfig | Mapping[str, Any]) -> "Schedule":
        if not isinstance(config, ScheduleConfig):
            config = ScheduleConfig.from_dict(config)
        return cls(jnp.asarray(make_betas(config), jnp.float32),
                   jnp.asarray(make_alphas_cumprod(config)), config)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def sigmas(self) -> jax.Array:
        """k-diffusion sigmas for t = 0 .. T-1 (`make_sigmas`)."""
        return jnp.asarray(make_sigmas(self.config))

    @property
    def snr(self) -> jax.Array:
        """Signal-to-noise ratio abar_t / (1 - abar_t) for t = 0 .. T-1."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)


@process.sample_time.register
def _sample_time(schedule: Schedule, rng: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    return jax.random.randint(rng, batch_shape, 0, schedule.num_train_timesteps)


@process.alpha_sigma.register
def alpha_sigma(schedule: Schedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timesteps t."""
    abar = schedule.alphas_cumprod[jnp.asarray(t)]
    return jnp.sqrt(abar), jnp.sqrt(1 - abar)


@process.model_time.register
def _model_time(schedule: Schedule, t: jax.Array) -> jax.Array:
    return t


@process.snr.register
def _snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    return schedule.snr[jnp.asarray(t)]  # abar / (1 - abar): exact where sqrt(abar)^2 is not


def velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = alpha_t eps - sigma_t x_0 (diffusers' `get_velocity`)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return x0_eps_to_prediction(x0, noise, per_example(alpha, x0), per_example(sigma, x0),
                                "v_prediction")


def prediction_to_x0_eps(prediction: jax.Array, x_t: jax.Array, alpha: jax.Array,
                         sigma: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """`process.prediction_to_x0_eps` for the table's prediction types, where alpha^2 +
    sigma^2 = 1: v-prediction needs no division, so it stays finite at alpha = 0 (zero
    terminal SNR) and the samplers match diffusers' arithmetic."""
    if prediction_type not in PREDICTION_TYPES:
        raise _unsupported("prediction_type", prediction_type, list(PREDICTION_TYPES))
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * prediction, alpha * prediction + sigma * x_t
    return process.prediction_to_x0_eps(prediction, x_t, alpha, sigma, prediction_type)


def posterior_coefficients(abar_t, abar_prev):
    """q(x_prev | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, variance) between two noise levels
    (consecutive training timesteps, or a sampler's subsequence). Works on numpy and jax
    arrays alike."""
    alpha_t = abar_t / abar_prev  # the one-step alpha between the two levels
    beta_t = 1 - alpha_t
    c_x0 = abar_prev**0.5 * beta_t / (1 - abar_t)
    c_xt = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    variance = (1 - abar_prev) / (1 - abar_t) * beta_t
    return c_x0, c_xt, variance


def posterior_mean_variance(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                            t_prev: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of the DDPM posterior q(x_{t_prev} | x_t, x_0); t_prev defaults to
    t - 1, and t_prev < 0 means the clean sample (abar = 1)."""
    t = jnp.asarray(t)
    t_prev = t - 1 if t_prev is None else jnp.asarray(t_prev)
    abar_t = schedule.alphas_cumprod[t]
    abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    c_x0, c_xt, variance = posterior_coefficients(abar_t, abar_prev)
    mean = per_example(c_x0, x0) * x0 + per_example(c_xt, x_t) * x_t
    return mean, variance

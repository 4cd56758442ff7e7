"""Rectified flow (SD3, Flux): the noise process x_t = (1 - t) x_0 + t eps on float t in [0, 1].

The network predicts the velocity v = eps - x_0 (`prediction_type = "flow"`) and is fed the
timestep t * num_train_timesteps, as diffusers' flow pipelines feed theirs (Flux's model
divides it by 1000 again). `FlowProcess` registers the `process` functions, so `add_noise`,
`training_target`, `snr`, `min_snr_weight` and the prediction conversions apply unchanged.

`FlowConfig` holds diffusers' `FlowMatchEulerDiscreteScheduler` config keys. Its timestep
shift moves sampling (and training) time towards noise: SD3's fixed `shift`,
t' = s t / (1 + (s - 1) t), or, with `use_dynamic_shifting` (Flux), a shift by
mu = `resolution_mu(image_seq_len)` chosen per image size, t' = e^mu / (e^mu + (1/t - 1)).
`inference_sigmas` is the scheduler's `set_timesteps`: the sigmas a sampler visits.

Training times (`sample_time`) follow the SD3 paper (Esser et al. 2024, section 3.1):
u drawn logit-normal (default mean 0, std 1), uniform, or by the "mode" density with scale
1.29, then shifted as sampling is where the shift is fixed (diffusers' SD3 scripts train on
the shifted sigmas; its Flux scripts, with dynamic shifting, on unshifted ones). The loss is
weighted over sigma by `loss_weighting`: "none", "sigma_sqrt" (sigma^-2) or "cosmap"
(2 / (pi (1 - 2 sigma + 2 sigma^2))), the paper's section 3.1 options as diffusers has them.
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

TIME_SHIFT_TYPES = ("exponential", "linear")
TIME_SAMPLINGS = ("logit_normal", "uniform", "mode")
# The SD3 paper's loss weightings over sigma, as diffusers' compute_loss_weighting_for_sd3.
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# FlowMatchEulerDiscreteScheduler keys that choose how to sample, not the process.
_SAMPLER_KEYS = frozenset({"invert_sigmas", "stochastic_sampling", "use_karras_sigmas",
                           "use_exponential_sigmas", "use_beta_sigmas"})
# Training-time keys (ours: diffusers' training scripts take them as arguments).
_TRAINING_KEYS = ("time_sampling", "logit_mean", "logit_std", "mode_scale", "loss_weighting")


def is_flow_config(section: Mapping[str, Any]) -> bool:
    """A FlowMatch scheduler config (by class name, or by keys only flow configs have)."""
    name = str(section.get("_class_name", ""))
    return name.startswith("FlowMatch") or "shift" in section or "use_dynamic_shifting" in section


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """diffusers `FlowMatchEulerDiscreteScheduler` config (its defaults), and how training
    draws its times."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"

    def __post_init__(self):
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"scheduler config: time_shift_type={self.time_shift_type!r} is not "
                             f"supported; supported: {list(TIME_SHIFT_TYPES)}.")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"--config.schedule.time_sampling={self.time_sampling!r}: use one of "
                             f"{list(TIME_SAMPLINGS)}.")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"--config.schedule.loss_weighting={self.loss_weighting!r}: use one of "
                             f"{list(LOSS_WEIGHTINGS)}.")
        if self.shift <= 0 or self.num_train_timesteps < 2:
            raise ValueError(f"scheduler config: shift={self.shift} must be > 0 and "
                             f"num_train_timesteps={self.num_train_timesteps} >= 2.")

    @property
    def prediction_type(self) -> str:
        return "flow"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FlowConfig":
        """From a FlowMatch `scheduler_config.json` dict or a config section with its keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key == "prediction_type" and value not in ("flow", "flow_prediction"):
                raise ValueError(f"scheduler config: a flow-matching scheduler predicts the flow, "
                                 f"not prediction_type={value!r}.")
            elif key in _SAMPLER_KEYS:
                if value:
                    raise ValueError(f"scheduler config: {key}=True is not supported; choose "
                                     "the sampler per call instead.")
            elif key != "prediction_type" and not key.startswith("_"):
                raise ValueError(f"scheduler config: unknown key {key!r} for a flow-matching "
                                 f"scheduler; supported keys: {sorted(fields)}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """diffusers' keys only (what a scheduler_config.json holds)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _TRAINING_KEYS}


# ----------------------------------------------------------------------------- the shifts


def shift_sigmas(config: FlowConfig, sigmas: np.ndarray, mu: float | None = None) -> np.ndarray:
    """The scheduler's shift of sigmas in (0, 1]: the fixed one, or the dynamic one by mu."""
    if config.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this flow schedule shifts by image size (use_dynamic_shifting): "
                             "pass mu, e.g. resolution_mu(config, image_seq_len)")
        if config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))
    return config.shift * sigmas / (1 + (config.shift - 1) * sigmas)


def resolution_mu(config: FlowConfig, image_seq_len: int) -> float:
    """Flux's mu for `image_seq_len` packed latent tokens: linear between (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift) (diffusers' `calculate_shift`)."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len
                                                      - config.base_image_seq_len)
    return image_seq_len * slope + config.base_shift - slope * config.base_image_seq_len


def stretch_to_terminal(config: FlowConfig, sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `shift_terminal`: sigmas stretched so the last one is `shift_terminal`."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))


def _train_sigma_range(config: FlowConfig) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the training grid t = 1..T / T, shifted unless dynamic,
    in float32 as the scheduler's constructor computes them."""
    T = config.num_train_timesteps
    grid = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
    if not config.use_dynamic_shifting:
        shift = np.float32(config.shift)
        grid = shift * grid / (np.float32(1) + (shift - np.float32(1)) * grid)
    return float(grid[0]), float(grid[-1])


def inference_sigmas(config: FlowConfig, num_steps: int, *, mu: float | None = None,
                     sigmas: np.ndarray | None = None) -> np.ndarray:
    """The n sigmas a FlowMatch sampler visits, then a final 0 (float32 values, as diffusers'
    `set_timesteps(num_steps, sigmas=, mu=)`): by default evenly spaced in t between the
    training grid's ends, or the given `sigmas` (Flux's pipeline passes linspace(1, 1/n, n)),
    then shifted."""
    if sigmas is None:
        sigma_max, sigma_min = _train_sigma_range(config)
        T = config.num_train_timesteps
        base = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
    else:
        base = np.asarray(sigmas, np.float32)
        if base.shape != (num_steps,):
            raise ValueError(f"sigmas: {base.shape[0] if base.ndim == 1 else base.shape} values "
                             f"for {num_steps} steps")
    shifted = shift_sigmas(config, base, mu)
    if config.shift_terminal:
        shifted = stretch_to_terminal(config, shifted)
    return np.append(np.asarray(shifted, np.float32), np.float32(0)).astype(np.float64)


# ----------------------------------------------------------------------------- the process


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class FlowProcess:
    config: FlowConfig = FlowConfig()

    @property
    def prediction_type(self) -> str:
        return "flow"

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "FlowProcess":
        return cls(FlowConfig.from_dict(section))


def _unit_times(config: FlowConfig, rng: jax.Array, batch_shape) -> jax.Array:
    if config.time_sampling == "uniform":
        return jax.random.uniform(rng, batch_shape)
    if config.time_sampling == "logit_normal":
        return jax.nn.sigmoid(config.logit_mean
                              + config.logit_std * jax.random.normal(rng, batch_shape))
    u = jax.random.uniform(rng, batch_shape)  # "mode": SD3 paper eq. 20
    return 1 - u - config.mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1 + u)


@process.sample_time.register
def _(p: FlowProcess, rng: jax.Array, batch_shape) -> jax.Array:
    t = _unit_times(p.config, rng, batch_shape)
    if not p.config.use_dynamic_shifting:
        t = p.config.shift * t / (1 + (p.config.shift - 1) * t)
    # t = 0 is clean (no signal to learn from the noise); keep times strictly inside (0, 1].
    return jnp.clip(t, 1.0 / p.config.num_train_timesteps, 1.0)


@process.loss_weight.register
def _(p: FlowProcess, t: jax.Array) -> jax.Array:
    sigma = jnp.asarray(t, jnp.float32)
    if p.config.loss_weighting == "sigma_sqrt":
        return sigma ** -2.0
    if p.config.loss_weighting == "cosmap":
        return 2.0 / (jnp.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    return jnp.ones_like(sigma)


@process.alpha_sigma.register
def _(p: FlowProcess, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = jnp.asarray(t, jnp.float32)
    return 1.0 - t, t


@process.model_time.register
def _(p: FlowProcess, t: jax.Array) -> jax.Array:
    return jnp.asarray(t, jnp.float32) * p.config.num_train_timesteps

"""Samplers of the reverse process, each one compiled `lax.scan` with diffusers' numerics.

Names (k-diffusion / ComfyUI) and the diffusers scheduler each one reproduces step for step:

    ddpm             DDPMScheduler (variance_type="fixed_small")
    ddim             DDIMScheduler (`eta` > 0 adds noise)
    pndm             PNDMScheduler(skip_prk_steps=True): PLMS, as Stable Diffusion ships it
    euler            EulerDiscreteScheduler                          (karras)
    euler_ancestral  EulerAncestralDiscreteScheduler
    heun             HeunDiscreteScheduler                           (karras)
    dpmpp_2m         DPMSolverMultistepScheduler, dpmsolver++, order 2 (karras)
    dpmpp_2m_sde     DPMSolverMultistepScheduler, sde-dpmsolver++, order 2 (karras)
    unipc            UniPCMultistepScheduler, bh2, order 2, predict_x0 (karras)
    lcm              LCMScheduler (original_inference_steps=50, timestep_scaling=10)

and on a rectified-flow schedule (`flow.FlowConfig`, a FlowMatch scheduler config):

    flow_euler       FlowMatchEulerDiscreteScheduler (shift, dynamic shift by `mu`, `sigmas`)
    flow_heun        FlowMatchHeunDiscreteScheduler
    dpmpp_2m         DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)
    unipc            UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)

The schedule (betas, prediction_type, timestep_spacing, steps_offset, zero-terminal-SNR) comes
from a `schedule.Schedule` or a diffusers scheduler config; `karras=True` is diffusers'
`use_karras_sigmas`.

Usage:

    plan = make_plan("dpmpp_2m", schedule, num_steps=25)          # host side, numpy
    x = initial_latents(plan, noise)                               # txt2img
    x = run(plan, model_fn, x, rng)                                # traceable: put it in jax.jit

or `sample(name, model_fn, noise, schedule, num_steps, rng, ...)`, which does all three.

`model_fn(x, t) -> prediction` is the network in the DDPM parameterisation: `x` is the raw
U-Net input (the sigma-space samplers scale their state by 1 / sqrt(sigma^2 + 1) themselves,
as diffusers' `scale_model_input`), `t` a float32 scalar timestep (fractional for Karras
sigmas of the sigma-space samplers), and it returns what `schedule.prediction_type` says.
The pipeline closes classifier-free guidance and the text context into it.

`make_plan` computes, with numpy on the host (the number of steps is static), everything a
step needs per *model evaluation*: the timestep, the input scaling and the solver's
coefficients. `run` is then one `lax.scan` over the evaluations, so the model is traced once
and the loop is one compiled program; multistep samplers carry their history in the scan
state. Most samplers evaluate the model once per step; `heun` twice (2 n - 1 evaluations:
its last step is an Euler step), `pndm` once more than its steps (the PLMS warm-up).

State and its noise level: `ddpm`, `ddim`, `pndm`, `lcm`, `dpmpp_*` and `unipc` hold
x_t = alpha_t x_0 + sigma_t eps; `euler*` and `heun` hold x_0 + s_t eps (k-diffusion), so
text-to-image starts from `noise * plan.init_noise_sigma` (`initial_latents`). The state after
inference step i (0-based) is at noise level i + 1; level `num_steps` is clean.
`noise_to_level(plan, x0, noise, level)` puts clean latents at a level (diffusers'
`scheduler.add_noise` at `timesteps[level]`).

img2img (diffusers' StableDiffusionImg2ImgPipeline): `start_step = img2img_start_step(
num_steps, strength)` steps are skipped (`get_timesteps`), the init latents are noised to
level `start_step`, and the remaining steps run, multistep samplers starting afresh with a
first-order step. `pndm` restarts its PLMS warm-up at `start_step` (diffusers indexes its
duplicated PLMS timestep list instead, which misaligns the warm-up for strength < 1).

Stochastic samplers (`ddpm`, `ddim` with eta > 0, `euler_ancestral`, `dpmpp_2m_sde`, `lcm`)
draw `jax.random.normal(fold_in(rng, e))` at evaluation e, or take `noises[e]` from an
explicit [num_evaluations, *latents.shape] array (replay against another implementation).

`step_callback(x, step_index) -> x` runs after every completed inference step (inpainting:
blend the known region with the init latents at `noise_to_level(..., step_index + 1)`).
`return_trajectory=True` also returns the state after every model evaluation,
[num_evaluations, *latents.shape]: the latents diffusers' loop holds after each `step` call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import flow, process
from diffusion_jax.diffusion.flow import FlowConfig, FlowProcess
from diffusion_jax.diffusion.schedule import (Schedule, ScheduleConfig, make_alphas_cumprod,
                                              make_sigmas, posterior_coefficients,
                                              prediction_to_x0_eps)

SAMPLERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "heun", "dpmpp_2m",
            "dpmpp_2m_sde", "unipc", "lcm")
FLOW_SAMPLERS = ("flow_euler", "flow_heun", "dpmpp_2m", "unipc")  # on a FlowConfig schedule
KARRAS_SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation grid
LCM_TIMESTEP_SCALING = 10.0
KARRAS_RHO = 7.0

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A sampler's step schedule, host-side numpy. `rows` hold one value per model evaluation:
    `timestep`, `input_scale` (model input = state * input_scale), `alpha`/`sigma` (the
    input's x = alpha x0 + sigma eps, to read the prediction), `level` (noise level reached
    after the evaluation, 0 mid-step) and the sampler's own coefficients."""

    sampler: str
    prediction_type: str
    num_steps: int
    start_step: int
    init_noise_sigma: float
    level_signal: np.ndarray  # [num_steps + 1]: state at level k = signal[k] x0 + noise[k] eps
    level_noise: np.ndarray
    rows: Mapping[str, np.ndarray]
    stochastic: bool
    num_train_timesteps: int

    @property
    def num_evaluations(self) -> int:
        return len(self.rows["timestep"])

    @property
    def timesteps(self) -> np.ndarray:
        return self.rows["timestep"]


# ---------------------------------------------------------------------------------------
# Host side: inference timesteps and sigmas, exactly as diffusers' `set_timesteps`.

def _spaced_timesteps(config: ScheduleConfig, n: int, grid: str) -> np.ndarray:
    """Descending inference timesteps. `grid`: "discrete" (DDPM/DDIM/PNDM, integers),
    "sigma" (Euler/Heun: linspace stays fractional) or "solver" (DPM-Solver/UniPC, which
    space n + 1 points and drop the last)."""
    T, spacing = config.num_train_timesteps, config.timestep_spacing
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    extra = 1 if grid == "solver" else 0
    if spacing == "linspace":
        if grid == "sigma":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, n + extra).round()[::-1][: n].astype(np.int64)
    ratio = T // (n + extra)  # leading
    return (np.arange(0, n + extra) * ratio).round()[::-1][: n].astype(np.int64) + config.steps_offset


def _alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    return make_alphas_cumprod(config).astype(np.float64)


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def _sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of sigmas, interpolating log-sigma between training timesteps."""
    log_train = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _vp(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of the variance-preserving point with k-diffusion sigma s."""
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    return alpha, sigmas * alpha


def _discrete_levels(abar_at_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.append(np.sqrt(abar_at_steps), 1.0), np.append(np.sqrt(1 - abar_at_steps), 0.0))


def _rows(**columns) -> dict[str, np.ndarray]:
    """Per-evaluation columns: float32 coefficients, int32 levels, boolean flags."""
    rows = {}
    for key, value in columns.items():
        value = np.asarray(value)
        rows[key] = (value.astype(np.int32) if key == "level" else value if value.dtype == bool
                     else value.astype(np.float32))
    return rows


# Plan builders: (config, n, start, eta, karras) -> (rows, level_signal, level_noise,
# init_noise_sigma, stochastic). Steps i = start .. n-1 each evaluate at level i.

def _plan_ddpm(config, n, start, eta, karras):
    abar = _alphas_cumprod(config)
    t = _spaced_timesteps(config, n, "discrete")
    t_prev = np.append(t[1:], -1)
    abar_t, abar_prev = abar[t], np.where(t_prev >= 0, abar[np.maximum(t_prev, 0)], 1.0)
    c_x0, c_xt, variance = posterior_coefficients(abar_t, abar_prev)
    std = np.where(t > 0, np.sqrt(np.maximum(variance, 1e-20)), 0.0)  # no noise into t = 0
    s = slice(start, n)
    rows = _rows(timestep=t[s], input_scale=np.ones(n - start), alpha=np.sqrt(abar_t[s]),
                 sigma=np.sqrt(1 - abar_t[s]), level=np.arange(start + 1, n + 1),
                 c_x0=c_x0[s], c_xt=c_xt[s], std=std[s])
    return rows, *_discrete_levels(abar_t), 1.0, True


def _plan_ddim(config, n, start, eta, karras):
    abar = _alphas_cumprod(config)
    t = _spaced_timesteps(config, n, "discrete")
    t_prev = t - config.num_train_timesteps // n  # diffusers' DDIM, whatever the spacing
    final = 1.0 if config.set_alpha_to_one else abar[0]
    abar_t, abar_prev = abar[t], np.where(t_prev >= 0, abar[np.maximum(t_prev, 0)], final)
    std = eta * np.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    s = slice(start, n)
    rows = _rows(timestep=t[s], input_scale=np.ones(n - start), alpha=np.sqrt(abar_t[s]),
                 sigma=np.sqrt(1 - abar_t[s]), level=np.arange(start + 1, n + 1),
                 c_x0=np.sqrt(abar_prev[s]), c_eps=np.sqrt(1 - abar_prev[s] - std[s] ** 2),
                 std=std[s])
    return rows, *_discrete_levels(abar_t), 1.0, eta > 0


# PLMS multistep weights of (current, previous, ...) noise predictions by history length.
_PLMS_WEIGHTS = {1: (1, 0, 0, 0), 2: (1.5, -0.5, 0, 0), 3: (23 / 12, -16 / 12, 5 / 12, 0),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _plan_pndm(config, n, start, eta, karras):
    """Replays PNDMScheduler.step_plms' bookkeeping: the first step runs twice (an Euler
    step, then a second-order step from the same sample with the averaged prediction)."""
    abar = _alphas_cumprod(config)
    t = _spaced_timesteps(config, n, "discrete")
    d = t[start:]
    listed = np.concatenate([d[:2], d[1:]])  # PNDMScheduler.plms_timesteps, from `start`
    ratio = config.num_train_timesteps // n
    final = 1.0 if config.set_alpha_to_one else abar[0]
    cols = {k: [] for k in ("t_from", "t_to", "w", "restart", "save", "push", "level")}
    history = 0
    for counter, t_listed in enumerate(listed):
        warmup_second = counter == 1
        t_from, t_to = (t_listed + ratio, t_listed) if warmup_second else (t_listed, t_listed - ratio)
        history = history if warmup_second else min(history + 1, 4)
        cols["w"].append((0.5, 0.5, 0, 0) if warmup_second else _PLMS_WEIGHTS[history])
        cols["t_from"].append(t_from), cols["t_to"].append(t_to)
        cols["restart"].append(warmup_second), cols["save"].append(counter == 0)
        cols["push"].append(not warmup_second)
        cols["level"].append(start + 1 if len(listed) == 1 else 0 if counter == 0 else start + counter)
    t_from, t_to, w = np.array(cols["t_from"]), np.array(cols["t_to"]), np.array(cols["w"])
    abar_t, abar_prev = abar[t_from], np.where(t_to >= 0, abar[np.maximum(t_to, 0)], final)
    denom = abar_t * np.sqrt(1 - abar_prev) + np.sqrt(abar_t * (1 - abar_t) * abar_prev)
    rows = _rows(timestep=listed, input_scale=np.ones(len(listed)), alpha=np.sqrt(abar_t),
                 sigma=np.sqrt(1 - abar_t), level=cols["level"],
                 c_x=np.sqrt(abar_prev / abar_t), c_eps=-(abar_prev - abar_t) / denom,
                 w0=w[:, 0], w1=w[:, 1], w2=w[:, 2], w3=w[:, 3], restart=np.array(cols["restart"]),
                 save=np.array(cols["save"]), push=np.array(cols["push"]))
    return rows, *_discrete_levels(abar[t]), 1.0, False


def _sigma_space_schedule(config, n, karras):
    """Euler/Heun sigmas (n, then a final 0) and their fractional timesteps."""
    train = make_sigmas(config)
    t = _spaced_timesteps(config, n, "sigma").astype(np.float64)
    sigmas = np.interp(t, np.arange(len(train)), train)
    if karras:
        sigmas = _karras_sigmas(sigmas[-1], sigmas[0], n)
        t = _sigma_to_t(sigmas, train)
    sigmas = np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)
    init = sigmas.max() if config.timestep_spacing in ("linspace", "trailing") \
        else np.sqrt(sigmas.max() ** 2 + 1)  # diffusers' init_noise_sigma
    return t.astype(np.float32), sigmas, float(init)


def _sigma_rows(t, sigma_in, level, **coefficients):
    scale = 1 / np.sqrt(sigma_in**2 + 1)
    return _rows(timestep=t, input_scale=scale, alpha=scale, sigma=sigma_in * scale,
                 level=level, sigma_in=sigma_in, **coefficients)


def _plan_euler(config, n, start, eta, karras):
    t, s, init = _sigma_space_schedule(config, n, karras)
    i = np.arange(start, n)
    rows = _sigma_rows(t[i], s[i], i + 1, dt=s[i + 1] - s[i])
    return rows, np.ones(n + 1), s, init, False


def _plan_euler_ancestral(config, n, start, eta, karras):
    t, s, init = _sigma_space_schedule(config, n, karras)
    i = np.arange(start, n)
    s_from, s_to = s[i], s[i + 1]
    sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    sigma_down = np.sqrt(s_to**2 - sigma_up**2)
    rows = _sigma_rows(t[i], s_from, i + 1, dt=sigma_down - s_from, sigma_up=sigma_up)
    return rows, np.ones(n + 1), s, init, True


def _plan_heun(config, n, start, eta, karras):
    """Per step an Euler evaluation at s_i, then a correction evaluated at s_{i+1} (none when
    s_{i+1} = 0: the last step is an Euler step)."""
    t, s, init = _sigma_space_schedule(config, n, karras)
    cols = {k: [] for k in ("t", "sigma_in", "dt", "second", "level")}
    for i in range(start, n):
        last = i == n - 1
        for second in (False,) if last else (False, True):
            cols["t"].append(t[i + 1] if second else t[i])
            cols["sigma_in"].append(s[i + 1] if second else s[i])
            cols["dt"].append(s[i + 1] - s[i]), cols["second"].append(second)
            cols["level"].append(i + 1 if second or last else 0)
    rows = _sigma_rows(np.array(cols["t"]), np.array(cols["sigma_in"]), cols["level"],
                       dt=np.array(cols["dt"]), second=np.array(cols["second"]))
    return rows, np.ones(n + 1), s, init, False


def _solver_schedule(config, n, karras, round_karras_timesteps):
    """DPM-Solver/UniPC sigmas (n, then a final 0) and their integer timesteps."""
    train = make_sigmas(config)
    t = _spaced_timesteps(config, n, "solver")
    sigmas = np.interp(t, np.arange(len(train)), train)
    if karras:
        sigmas = _karras_sigmas(train[0].item(), train[-1].item(), n)
        t = _sigma_to_t(sigmas, train)
        t = (t.round() if round_karras_timesteps else t).astype(np.int64)
    return t, np.append(sigmas, 0.0).astype(np.float32).astype(np.float64)


def _flow_solver_schedule(config: FlowConfig, n, sampler, mu):
    """DPMSolverMultistep / UniPCMultistep with `use_flow_sigmas=True` (`flow_shift` = the
    config's shift, or e^mu for a dynamic one): their n flow sigmas, a final 0, and the
    integer timesteps they feed the model (truncated, as their int64 cast does)."""
    T = config.num_train_timesteps
    if sampler == "dpmpp_2m":  # diffusers shifts 1 - alphas, flips, drops the last (zero)
        shift = math.exp(mu) if mu is not None and config.use_dynamic_shifting else config.shift
        s = 1.0 - np.linspace(1, 1 / T, n + 1)
        s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
    else:
        s = flow.shift_sigmas(config, np.linspace(1, 1 / T, n + 1)[:-1], mu)
        if config.shift_terminal:
            s = flow.stretch_to_terminal(config, s)
        if abs(s[0] - 1) < 1e-6:
            s[0] -= 1e-6  # UniPC keeps log(alpha) finite at its first step
    t = (s * T).astype(np.int64)
    s = np.append(s, 0.0).astype(np.float32).astype(np.float64)
    return t, 1 - s, s


def _solver_points(config, n, karras, sampler, mu, round_karras_timesteps):
    """(timesteps [n], alpha [n + 1], sigma [n + 1]) of a DPM-Solver / UniPC run."""
    if isinstance(config, FlowConfig):
        return _flow_solver_schedule(config, n, sampler, mu)
    t, s = _solver_schedule(config, n, karras, round_karras_timesteps)
    return (t, *_vp(s))


def _log_snr(alpha, sigma):
    with np.errstate(divide="ignore"):  # sigma = 0 after the last step: lambda = inf
        return np.log(alpha) - np.log(sigma)


def _plan_dpmpp(config, n, start, eta, karras, *, sde, mu=None, sigmas=None):
    """DPM-Solver++(2M), data prediction, midpoint; first order on its first and last step."""
    t, alpha, sigma = _solver_points(config, n, karras, "dpmpp_2m", mu,
                                     getattr(config, "beta_schedule", "") != "squaredcos_cap_v2")
    lam = _log_snr(alpha, sigma)
    i = np.arange(start, n)
    h = lam[i + 1] - lam[i]
    if sde:
        c_x = sigma[i + 1] / sigma[i] * np.exp(-h)
        c_d = alpha[i + 1] * (1 - np.exp(-2 * h))
        c_noise = sigma[i + 1] * np.sqrt(1 - np.exp(-2 * h))
    else:
        c_x, c_d, c_noise = sigma[i + 1] / sigma[i], -alpha[i + 1] * np.expm1(-h), np.zeros_like(h)
    second_order = (i > start) & (i < n - 1)
    r = np.array([(lam[k] - lam[k - 1]) / hk if so else 1.0 for k, hk, so in zip(i, h, second_order)])
    rows = _rows(timestep=t[i], input_scale=np.ones(n - start), alpha=alpha[i], sigma=sigma[i],
                 level=i + 1, c_x=c_x, c_d=c_d, c_noise=c_noise,
                 c_diff=np.where(second_order, 0.5 / r, 0.0))
    return rows, alpha, sigma, 1.0, sde


def _plan_unipc(config, n, start, eta, karras, mu=None, sigmas=None):
    """UniPC-bh2, data prediction, order 2 (first order on its first and last step): each
    step first corrects the previous step's result with the new prediction (UniC), then
    predicts the next state (UniP). Both are linear in the state and the predictions."""
    t, alpha, sigma = _solver_points(config, n, karras, "unipc", mu, True)
    lam = _log_snr(alpha, sigma)
    order = {i: 1 if i in (start, n - 1) else 2 for i in range(start, n)}
    cols = {k: [] for k in ("corrector", "c_x", "c_cur", "c_prev", "c_prev2",
                            "p_x", "p_cur", "p_prev")}
    for i in range(start, n):
        # Predictor i -> i + 1 from the data predictions m_i (and m_{i-1}).
        h = lam[i + 1] - lam[i]
        b_h = np.expm1(-h)
        p_cur, p_prev = -alpha[i + 1] * b_h, 0.0
        if order[i] == 2:
            r = (lam[i - 1] - lam[i]) / h
            p_cur, p_prev = p_cur + alpha[i + 1] * b_h * 0.5 / r, -alpha[i + 1] * b_h * 0.5 / r
        cols["p_x"].append(sigma[i + 1] / sigma[i]), cols["p_cur"].append(p_cur)
        cols["p_prev"].append(p_prev)
        # Corrector of x_i from step i-1, once m_i is known, of the previous step's order.
        c = dict(corrector=i > start, c_x=1.0, c_cur=0.0, c_prev=0.0, c_prev2=0.0)
        if i > start:
            h = lam[i] - lam[i - 1]
            b_h = np.expm1(-h)
            c.update(c_x=sigma[i] / sigma[i - 1], c_prev=-alpha[i] * b_h)
            if order[i - 1] == 1:
                rho_older, rho_now, r = 0.0, 0.5, 1.0
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                phi = b_h / -h - 1  # h phi_k(h) recursion of diffusers, k = 1, 2
                b = [phi / b_h, (phi / -h - 0.5) * 2 / b_h]
                rho_older, rho_now = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), b)
            # x_c = c_x x_{i-1} - alpha_i B(h) (m_{i-1} + rho_older D1 + rho_now (m_i - m_{i-1}))
            scale = -alpha[i] * b_h
            c["c_cur"] = scale * rho_now
            c["c_prev"] = scale * (1 - rho_now - rho_older / r)
            c["c_prev2"] = scale * rho_older / r
        for k, v in c.items():
            cols[k].append(v)
    i = np.arange(start, n)
    rows = _rows(timestep=t[i], input_scale=np.ones(n - start), alpha=alpha[i], sigma=sigma[i],
                 level=i + 1, **{k: np.array(v) for k, v in cols.items()})
    return rows, alpha, sigma, 1.0, False


def _plan_lcm(config, n, start, eta, karras):
    """LCMScheduler: denoise with the consistency boundary scalings, re-noise to the next
    timestep (not after the last) on the distillation grid of 50 timesteps."""
    T, abar = config.num_train_timesteps, _alphas_cumprod(config)
    if n > LCM_ORIGINAL_STEPS:
        raise ValueError(f"lcm: num_steps={n} exceeds the {LCM_ORIGINAL_STEPS} timesteps of the "
                         "LCM distillation grid.")
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * (T // LCM_ORIGINAL_STEPS) - 1)[::-1]
    t = grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)]
    i = np.arange(start, n)
    last = i == n - 1
    abar_next = abar[t[np.minimum(i + 1, n - 1)]]
    scaled = t[i] * LCM_TIMESTEP_SCALING  # boundary scalings with sigma_data^2 = 0.25
    rows = _rows(timestep=t[i], input_scale=np.ones(n - start), alpha=np.sqrt(abar[t[i]]),
                 sigma=np.sqrt(1 - abar[t[i]]), level=i + 1,
                 c_skip=0.25 / (scaled**2 + 0.25), c_out=scaled / np.sqrt(scaled**2 + 0.25),
                 c_signal=np.where(last, 1.0, np.sqrt(abar_next)),
                 c_noise=np.where(last, 0.0, np.sqrt(1 - abar_next)))
    return rows, *_discrete_levels(abar[t]), 1.0, True


# Rectified flow (FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler): the state
# is x = (1 - s) x0 + s eps itself, the model is fed s * T and predicts the velocity dx/ds.

def _flow_rows(config, s_in, level, **coefficients):
    s_in = np.asarray(s_in, np.float32)
    return _rows(timestep=s_in * np.float32(config.num_train_timesteps),
                 input_scale=np.ones(len(s_in)), alpha=1 - s_in.astype(np.float64),
                 sigma=s_in, level=level, **coefficients)


def _plan_flow_euler(config, n, start, eta, karras, mu=None, sigmas=None):
    s = flow.inference_sigmas(config, n, mu=mu, sigmas=sigmas)
    i = np.arange(start, n)
    rows = _flow_rows(config, s[i], i + 1, dt=s[i + 1] - s[i])
    return rows, 1 - s, s, 1.0, False


def _plan_flow_heun(config, n, start, eta, karras, mu=None, sigmas=None):
    """As `heun`: an Euler evaluation at s_i, then one at s_{i+1} averaging the two
    velocities (none after the last step, which ends at s = 0)."""
    s = flow.inference_sigmas(config, n, mu=mu, sigmas=sigmas)
    cols = {k: [] for k in ("sigma_in", "dt", "second", "level")}
    for i in range(start, n):
        last = i == n - 1
        for second in (False,) if last else (False, True):
            cols["sigma_in"].append(s[i + 1] if second else s[i])
            cols["dt"].append(s[i + 1] - s[i]), cols["second"].append(second)
            cols["level"].append(i + 1 if second or last else 0)
    rows = _flow_rows(config, cols["sigma_in"], cols["level"], dt=np.array(cols["dt"]),
                      second=np.array(cols["second"]))
    return rows, 1 - s, s, 1.0, False


# ---------------------------------------------------------------------------------------
# Device side: one pure step per sampler, (state, prediction, row, noise) -> state.

def _read(state, pred, row, prediction_type):
    x_in = state["x"] * row["input_scale"]
    # The table's conversion drops alpha^2 + sigma^2 = 1; a flow state is not on that circle.
    convert = process.prediction_to_x0_eps if prediction_type == "flow" else prediction_to_x0_eps
    return convert(pred, x_in, row["alpha"], row["sigma"], prediction_type)


def ddpm_step(state, pred, row, noise, prediction_type):
    x0, _ = _read(state, pred, row, prediction_type)
    return {"x": row["c_x0"] * x0 + row["c_xt"] * state["x"] + row["std"] * noise}


def ddim_step(state, pred, row, noise, prediction_type):
    x0, eps = _read(state, pred, row, prediction_type)
    x = row["c_x0"] * x0 + row["c_eps"] * eps
    return {"x": x if noise is None else x + row["std"] * noise}


def pndm_step(state, pred, row, noise, prediction_type):
    # diffusers combines the raw outputs, then reads them as noise at the step's start.
    combined = (row["w0"] * pred + row["w1"] * state["h1"] + row["w2"] * state["h2"]
                + row["w3"] * state["h3"])
    base = jnp.where(row["restart"], state["saved"], state["x"])
    _, eps = prediction_to_x0_eps(combined, base, row["alpha"], row["sigma"], prediction_type)
    push = lambda new, old: jnp.where(row["push"], new, old)
    return {"x": row["c_x"] * base + row["c_eps"] * eps,
            "saved": jnp.where(row["save"], state["x"], state["saved"]),
            "h1": push(pred, state["h1"]), "h2": push(state["h1"], state["h2"]),
            "h3": push(state["h2"], state["h3"])}


def _derivative(state, pred, row, prediction_type):
    x0, _ = _read(state, pred, row, prediction_type)
    return (state["x"] - x0) / row["sigma_in"]


def euler_step(state, pred, row, noise, prediction_type):
    return {"x": state["x"] + _derivative(state, pred, row, prediction_type) * row["dt"]}


def euler_ancestral_step(state, pred, row, noise, prediction_type):
    x = state["x"] + _derivative(state, pred, row, prediction_type) * row["dt"]
    return {"x": x + row["sigma_up"] * noise}


def heun_step(state, pred, row, noise, prediction_type):
    d = _derivative(state, pred, row, prediction_type)
    second = row["second"]
    x = jnp.where(second, state["saved"] + 0.5 * (state["d"] + d) * row["dt"],
                  state["x"] + d * row["dt"])
    return {"x": x, "saved": jnp.where(second, state["saved"], state["x"]),
            "d": jnp.where(second, state["d"], d)}


def dpmpp_step(state, pred, row, noise, prediction_type):
    x0, _ = _read(state, pred, row, prediction_type)
    x = row["c_x"] * state["x"] + row["c_d"] * (x0 + row["c_diff"] * (x0 - state["x0_prev"]))
    if noise is not None:
        x = x + row["c_noise"] * noise
    return {"x": x, "x0_prev": x0}


def unipc_step(state, pred, row, noise, prediction_type):
    m, _ = _read(state, pred, row, prediction_type)
    corrected = (row["c_x"] * state["x_last"] + row["c_cur"] * m + row["c_prev"] * state["m_prev"]
                 + row["c_prev2"] * state["m_prev2"])
    x = jnp.where(row["corrector"], corrected, state["x"])
    return {"x": row["p_x"] * x + row["p_cur"] * m + row["p_prev"] * state["m_prev"],
            "x_last": x, "m_prev": m, "m_prev2": state["m_prev"]}


def flow_euler_step(state, pred, row, noise, prediction_type):
    return {"x": state["x"] + row["dt"] * pred}


def flow_heun_step(state, pred, row, noise, prediction_type):
    second = row["second"]
    x = jnp.where(second, state["saved"] + 0.5 * (state["d"] + pred) * row["dt"],
                  state["x"] + pred * row["dt"])
    return {"x": x, "saved": jnp.where(second, state["saved"], state["x"]),
            "d": jnp.where(second, state["d"], pred)}


def lcm_step(state, pred, row, noise, prediction_type):
    x0, _ = _read(state, pred, row, prediction_type)
    denoised = row["c_out"] * x0 + row["c_skip"] * state["x"]
    return {"x": row["c_signal"] * denoised + row["c_noise"] * noise}


@dataclasses.dataclass(frozen=True)
class _SamplerSpec:
    build: Callable
    step: Callable
    history: tuple[str, ...] = ()  # state slots besides "x", zero-initialised


_REGISTRY = {
    "ddpm": _SamplerSpec(_plan_ddpm, ddpm_step),
    "ddim": _SamplerSpec(_plan_ddim, ddim_step),
    "pndm": _SamplerSpec(_plan_pndm, pndm_step, ("saved", "h1", "h2", "h3")),
    "euler": _SamplerSpec(_plan_euler, euler_step),
    "euler_ancestral": _SamplerSpec(_plan_euler_ancestral, euler_ancestral_step),
    "heun": _SamplerSpec(_plan_heun, heun_step, ("saved", "d")),
    "dpmpp_2m": _SamplerSpec(functools.partial(_plan_dpmpp, sde=False), dpmpp_step, ("x0_prev",)),
    "dpmpp_2m_sde": _SamplerSpec(functools.partial(_plan_dpmpp, sde=True), dpmpp_step, ("x0_prev",)),
    "unipc": _SamplerSpec(_plan_unipc, unipc_step, ("x_last", "m_prev", "m_prev2")),
    "lcm": _SamplerSpec(_plan_lcm, lcm_step),
    "flow_euler": _SamplerSpec(_plan_flow_euler, flow_euler_step),
    "flow_heun": _SamplerSpec(_plan_flow_heun, flow_heun_step, ("saved", "d")),
}


# ---------------------------------------------------------------------------------------
# Public API.

AnySchedule = Schedule | ScheduleConfig | FlowProcess | FlowConfig | Mapping[str, Any]


def _schedule_config(schedule: AnySchedule) -> ScheduleConfig | FlowConfig:
    if isinstance(schedule, (Schedule, FlowProcess)):
        return schedule.config
    if isinstance(schedule, (ScheduleConfig, FlowConfig)):
        return schedule
    return FlowConfig.from_dict(schedule) if flow.is_flow_config(schedule) \
        else ScheduleConfig.from_dict(schedule)


CUSTOM_SIGMA_SAMPLERS = ("flow_euler", "flow_heun")  # those that take make_plan(sigmas=)


def _check_flow_options(name: str, config, karras: bool, mu, sigmas) -> None:
    if isinstance(config, FlowConfig):
        if name not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {name!r} is for DDPM schedules; a flow-matching schedule "
                             f"samples with {list(FLOW_SAMPLERS)}.")
        if karras:
            raise ValueError("karras sigmas are not supported on a flow-matching schedule.")
        if sigmas is not None and name not in CUSTOM_SIGMA_SAMPLERS:
            raise ValueError(f"sigmas: {name} on flow sigmas makes its own; only flow_euler "
                             "and flow_heun take custom sigmas.")
    elif name.startswith("flow_") or mu is not None or sigmas is not None:
        raise ValueError(f"{name if name.startswith('flow_') else 'mu / sigmas'}: only for a "
                         "flow-matching schedule (a FlowMatch scheduler config); this one is DDPM.")


def make_plan(name: str, schedule: AnySchedule, num_steps: int, *, eta: float = 0.0,
              karras: bool = False, start_step: int = 0, mu: float | None = None,
              sigmas: np.ndarray | None = None) -> Plan:
    """The step schedule of sampler `name` for `num_steps` inference steps, of which the
    first `start_step` are skipped (img2img). Host-side: it reads only the schedule's (static)
    config, so it also works on a `Schedule` traced through `jax.jit`. On a flow schedule,
    `mu` is the image-size shift of a dynamic one (`flow.resolution_mu`) and `sigmas` the
    unshifted sigmas to visit (diffusers' `set_timesteps(sigmas=)`; Flux's pipeline passes
    linspace(1, 1/n, n))."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: "
                         f"{list(dict.fromkeys(SAMPLERS + FLOW_SAMPLERS))}.")
    config = _schedule_config(schedule)
    _check_flow_options(name, config, karras, mu, sigmas)
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps={num_steps}: must be in 1 .. {config.num_train_timesteps}.")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step={start_step}: must be in 0 .. num_steps - 1 = {num_steps - 1}.")
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(f"karras sigmas apply to {list(KARRAS_SAMPLERS)}, not {name!r}.")
    if (eta and name != "ddim") or eta < 0:
        raise ValueError(f"eta={eta}: only ddim takes eta, and it must be >= 0.")
    extra = {"mu": mu, "sigmas": sigmas} if isinstance(config, FlowConfig) else {}
    rows, signal, noise, init, stochastic = _REGISTRY[name].build(
        config, num_steps, start_step, eta, karras, **extra)
    return Plan(name, config.prediction_type, num_steps, start_step, init,
                np.asarray(signal, np.float32), np.asarray(noise, np.float32), rows, stochastic,
                config.num_train_timesteps)


def img2img_start_step(num_steps: int, strength: float, *, flow: bool = False) -> int:
    """Steps skipped at img2img `strength` (diffusers' `get_timesteps`: t_start). Its SD
    pipelines skip n - int(n strength) steps, its flow pipelines (SD3, Flux) int(n - n strength):
    one more where n strength is fractional."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength={strength}: must be in [0, 1].")
    start = int(max(num_steps - num_steps * strength, 0)) if flow else \
        num_steps - min(int(num_steps * strength), num_steps)
    if start >= num_steps:
        raise ValueError(f"strength={strength} leaves none of the {num_steps} steps to run.")
    return start


# SDXL's ensemble of experts (diffusers' `denoising_end` / `denoising_start`): the base runs the
# evaluations at timesteps at or above a cutoff and hands its latents over; the refiner runs
# the rest of the same schedule, from a step boundary, without adding noise.

def _timestep_cutoff(plan: Plan, fraction: float, name: str) -> int:
    if not 0 < fraction < 1:
        raise ValueError(f"{name}={fraction}: must be in (0, 1), the fraction of the schedule "
                         "the base model denoises (0.8 is the SDXL recipe)")
    T = plan.num_train_timesteps
    return int(round(T - fraction * T))


def truncated(plan: Plan, denoising_end: float) -> Plan:
    """The plan's evaluations at timesteps >= the cutoff of `denoising_end`: the base model
    of an ensemble stops there and returns its latents (diffusers' `denoising_end`)."""
    keep = int((plan.timesteps >= _timestep_cutoff(plan, denoising_end, "denoising_end")).sum())
    if keep == 0:
        raise ValueError(f"denoising_end={denoising_end} leaves none of the {plan.num_steps} "
                         "steps to the base model: raise it")
    return dataclasses.replace(plan, rows={k: v[:keep] for k, v in plan.rows.items()})


def denoising_start_step(name: str, schedule: Schedule | ScheduleConfig | Mapping[str, Any],
                         num_steps: int, denoising_start: float, *, karras: bool = False) -> int:
    """The step an ensemble's refiner starts at: diffusers' `get_timesteps(denoising_start=)`
    keeps the evaluations below the cutoff (one more for a second-order sampler, so the run
    starts at a whole step) and begins its scheduler there."""
    full = make_plan(name, schedule, num_steps, karras=karras)
    remaining = int((full.timesteps < _timestep_cutoff(full, denoising_start, "denoising_start")).sum())
    if name == "heun" and remaining % 2 == 0:
        remaining += 1  # heun: every timestep but the first is evaluated twice
    if remaining == 0:
        raise ValueError(f"denoising_start={denoising_start} leaves none of the {num_steps} "
                         "steps to the refiner: lower it")
    first = full.num_evaluations - remaining
    return int((full.rows["level"][:first] > 0).sum())  # completed steps before it


def noise_to_level(plan: Plan, x0: jax.Array, noise: jax.Array, level: jax.Array | int) -> jax.Array:
    """Clean latents put at noise `level` of the plan (a traced level works too)."""
    signal, sigma = jnp.asarray(plan.level_signal)[level], jnp.asarray(plan.level_noise)[level]
    return (signal * x0 + sigma * noise).astype(x0.dtype)


def initial_latents(plan: Plan, noise: jax.Array, init_latents: jax.Array | None = None) -> jax.Array:
    """Starting state: unit `noise` scaled for the sampler (txt2img), or `init_latents` noised
    to level `plan.start_step` with it (img2img)."""
    if init_latents is not None:
        return noise_to_level(plan, init_latents, noise, plan.start_step)
    if plan.start_step:
        raise ValueError("start_step > 0 continues from partly noised latents: pass init_latents.")
    return (noise * plan.init_noise_sigma).astype(noise.dtype)


def run(plan: Plan, model_fn: ModelFn, latents: jax.Array, rng: jax.Array | None = None, *,
        noises: jax.Array | None = None,
        step_callback: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        return_trajectory: bool = False, evaluation_inputs: Any = None):
    """Run the plan from `latents` (see `initial_latents`): returns the final latents, and
    with `return_trajectory` also the state after every model evaluation. Traceable.
    `evaluation_inputs`: a pytree of arrays with one row per model evaluation (leading axis),
    given to the model as `model_fn(x, t, row)` (a ControlNet's scale at that step)."""
    sampler = _REGISTRY[plan.sampler]
    evaluations = plan.num_evaluations
    if noises is not None and noises.shape != (evaluations, *latents.shape):
        raise ValueError(f"noises: expected shape {(evaluations, *latents.shape)}, got {noises.shape}.")
    if plan.stochastic and noises is None and rng is None:
        raise ValueError(f"sampler {plan.sampler!r} is stochastic: pass rng or noises.")
    rows = {k: jnp.asarray(v) for k, v in plan.rows.items()}
    step = functools.partial(sampler.step, prediction_type=plan.prediction_type)

    def body(state, xs):
        row, index, noise, extra = xs
        if plan.stochastic and noise is None:
            noise = jax.random.normal(jax.random.fold_in(rng, index), latents.shape, latents.dtype)
        model_args = () if evaluation_inputs is None else (extra,)
        pred = model_fn(state["x"] * row["input_scale"], row["timestep"], *model_args)
        new = step(state, pred, row, noise if plan.stochastic else None)
        new = {k: v.astype(state[k].dtype) for k, v in new.items()}
        if step_callback is not None:
            reached = row["level"] > 0
            new["x"] = jnp.where(reached, step_callback(new["x"], row["level"] - 1), new["x"])
        return new, new["x"] if return_trajectory else None

    state = {"x": latents, **{k: jnp.zeros_like(latents) for k in sampler.history}}
    xs = (rows, jnp.arange(evaluations), noises, evaluation_inputs)
    state, trajectory = jax.lax.scan(body, state, xs)
    return (state["x"], trajectory) if return_trajectory else state["x"]


def sample(name: str, model_fn: ModelFn, noise: jax.Array, schedule: AnySchedule,
           num_steps: int, rng: jax.Array | None = None, *, eta: float = 0.0,
           karras: bool = False, start_step: int = 0, mu: float | None = None,
           sigmas: np.ndarray | None = None, init_latents: jax.Array | None = None,
           noises: jax.Array | None = None,
           step_callback: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
           return_trajectory: bool = False):
    """`make_plan`, `initial_latents` and `run` in one call (traceable; the schedule's
    config and the options are static). `noise` is unit Gaussian noise of the latents' shape."""
    plan = make_plan(name, schedule, num_steps, eta=eta, karras=karras, start_step=start_step,
                     mu=mu, sigmas=sigmas)
    latents = initial_latents(plan, noise, init_latents)
    return run(plan, model_fn, latents, rng, noises=noises, step_callback=step_callback,
               return_trajectory=return_trajectory)

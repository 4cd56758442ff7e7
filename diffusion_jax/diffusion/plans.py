"""Host side of the samplers: each one's inference timesteps, sigmas and per-evaluation
coefficients in numpy, exactly as diffusers' `set_timesteps` and `step` compute them.

`NAME(config, n, start, eta, karras, ...)` -> (rows, level_signal, level_noise,
init_noise_sigma, stochastic), which `samplers.make_plan` wraps into a `Plan`; `samplers.py`
holds the device-side step of each and the one `lax.scan` that runs them.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_jax.diffusion import flow
from diffusion_jax.diffusion.flow import FlowConfig
from diffusion_jax.diffusion.schedule import (ScheduleConfig, make_alphas_cumprod, make_sigmas,
                                              posterior_coefficients)

LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation grid
LCM_TIMESTEP_SCALING = 10.0
KARRAS_RHO = 7.0

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

def ddpm(config, n, start, eta, karras):
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


def ddim(config, n, start, eta, karras):
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


def pndm(config, n, start, eta, karras):
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


def euler(config, n, start, eta, karras):
    t, s, init = _sigma_space_schedule(config, n, karras)
    i = np.arange(start, n)
    rows = _sigma_rows(t[i], s[i], i + 1, dt=s[i + 1] - s[i])
    return rows, np.ones(n + 1), s, init, False


def euler_ancestral(config, n, start, eta, karras):
    t, s, init = _sigma_space_schedule(config, n, karras)
    i = np.arange(start, n)
    s_from, s_to = s[i], s[i + 1]
    sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    sigma_down = np.sqrt(s_to**2 - sigma_up**2)
    rows = _sigma_rows(t[i], s_from, i + 1, dt=sigma_down - s_from, sigma_up=sigma_up)
    return rows, np.ones(n + 1), s, init, True


def heun(config, n, start, eta, karras):
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


def dpmpp(config, n, start, eta, karras, *, sde, mu=None, sigmas=None):
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


def unipc(config, n, start, eta, karras, mu=None, sigmas=None):
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


def lcm(config, n, start, eta, karras):
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


def flow_euler(config, n, start, eta, karras, mu=None, sigmas=None):
    s = flow.inference_sigmas(config, n, mu=mu, sigmas=sigmas)
    i = np.arange(start, n)
    rows = _flow_rows(config, s[i], i + 1, dt=s[i + 1] - s[i])
    return rows, 1 - s, s, 1.0, False


def flow_heun(config, n, start, eta, karras, mu=None, sigmas=None):
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

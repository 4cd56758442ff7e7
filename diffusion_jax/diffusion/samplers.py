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

`make_plan` computes, with numpy on the host (plans.py; the number of steps is static),
everything a step needs per *model evaluation*: the timestep, the input scaling and the
solver's coefficients. `run` is then one `lax.scan` over the evaluations, so the model is traced once
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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import flow, plans, process
from diffusion_jax.diffusion.flow import FlowConfig, FlowProcess
from diffusion_jax.diffusion.schedule import Schedule, ScheduleConfig, prediction_to_x0_eps

SAMPLERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "heun", "dpmpp_2m",
            "dpmpp_2m_sde", "unipc", "lcm")
FLOW_SAMPLERS = ("flow_euler", "flow_heun", "dpmpp_2m", "unipc")  # on a FlowConfig schedule
KARRAS_SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")

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
    "ddpm": _SamplerSpec(plans.ddpm, ddpm_step),
    "ddim": _SamplerSpec(plans.ddim, ddim_step),
    "pndm": _SamplerSpec(plans.pndm, pndm_step, ("saved", "h1", "h2", "h3")),
    "euler": _SamplerSpec(plans.euler, euler_step),
    "euler_ancestral": _SamplerSpec(plans.euler_ancestral, euler_ancestral_step),
    "heun": _SamplerSpec(plans.heun, heun_step, ("saved", "d")),
    "dpmpp_2m": _SamplerSpec(functools.partial(plans.dpmpp, sde=False), dpmpp_step, ("x0_prev",)),
    "dpmpp_2m_sde": _SamplerSpec(functools.partial(plans.dpmpp, sde=True), dpmpp_step, ("x0_prev",)),
    "unipc": _SamplerSpec(plans.unipc, unipc_step, ("x_last", "m_prev", "m_prev2")),
    "lcm": _SamplerSpec(plans.lcm, lcm_step),
    "flow_euler": _SamplerSpec(plans.flow_euler, flow_euler_step),
    "flow_heun": _SamplerSpec(plans.flow_heun, flow_heun_step, ("saved", "d")),
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

"""Every sampler's whole trajectory against the diffusers PyTorch scheduler loop.

The model is a fixed nonlinear function of (x, t), written identically in torch and jnp.
Stochastic samplers get the same noise arrays on both sides (diffusers' `randn_tensor` pops
them). Error (`trajectory_error`): max over model evaluations of max|ours - diffusers| over
max(1, max|state before|, max|state after|); bound 1e-5 in float32.
"""

import inspect
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import diffusers
from diffusers import StableDiffusionImg2ImgPipeline
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedule import Schedule

SHAPE = (2, 4, 8, 8)
TOL = 1e-5
SD15 = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
            beta_end=0.012, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")

REFERENCE = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def model_torch(x, t):
    t = torch.as_tensor(t).to(torch.float32)
    return (torch.tanh(x) * (0.9 + 0.1 * torch.cos(t / 300))
            + 0.05 * torch.roll(x, 1, -1) * torch.sin(t / 150))


def model_jax(x, t):
    return jnp.tanh(x) * (0.9 + 0.1 * jnp.cos(t / 300)) + 0.05 * jnp.roll(x, 1, -1) * jnp.sin(t / 150)


def reference_scheduler(name, config, karras=False):
    cls_name, options = REFERENCE[name]
    cls = getattr(diffusers, cls_name)
    # SD configs' values of the options diffusers defaults otherwise.
    kwargs = {"clip_sample": False, "set_alpha_to_one": False, **config, **options}
    if karras:
        kwargs["use_karras_sigmas"] = True
    accepted = inspect.signature(cls.__init__).parameters
    if kwargs.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in accepted:
        raise ValueError(f"{cls_name} has no zero-terminal-SNR option")
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def patch_noise(monkeypatch, noises):
    """Make every diffusers scheduler draw its noise from `noises`, in order."""
    queue = list(torch.from_numpy(np.asarray(noises))) if noises is not None else []
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("diffusers.schedulers.scheduling_") \
                and hasattr(module, "randn_tensor"):
            monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: queue.pop(0).reshape(shape))


def diffusers_trajectory(monkeypatch, name, config, n, noise, *, noises=None, karras=False,
                         eta=0.0, start=0, init=None, mask=None):
    """The latents after every `scheduler.step` of diffusers' SD pipelines' loop: txt2img,
    img2img from `start` (get_timesteps / add_noise) and 4-channel inpainting's blending."""
    scheduler = reference_scheduler(name, config, karras)  # imports its module first
    patch_noise(monkeypatch, noises)
    scheduler.set_timesteps(n)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    noise = torch.from_numpy(np.asarray(noise))
    if init is not None:
        init = torch.from_numpy(np.asarray(init))
    x = scheduler.add_noise(init, noise, timesteps[:1]) if start else noise * scheduler.init_noise_sigma
    trajectory = []
    for i, t in enumerate(timesteps):
        pred = model_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(pred, t, x, **({"eta": eta} if name == "ddim" else {})).prev_sample
        if mask is not None:
            known = init if i == len(timesteps) - 1 else scheduler.add_noise(init, noise, timesteps[i + 1:i + 2])
            x = (1 - mask) * known + mask * x
        trajectory.append(x.numpy().copy())
    return np.stack(trajectory)


def trajectory_error(ours, ref, start) -> float:
    """Per evaluation: max|ours - ref| over the scale of that step's input and output state
    (a float32 step from x loses ~1e-7 |x|: the first step from sigma_max = 4096 of a
    zero-terminal-SNR schedule cancels values of 1e4 down to 1e1)."""
    assert ours.shape == ref.shape
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    inputs = np.concatenate([np.asarray(start, np.float64)[None], ref[:-1]])
    return max(np.abs(a - b).max() / max(1.0, np.abs(b).max(), np.abs(x).max())
               for a, b, x in zip(ours, ref, inputs))


def inputs(plan, seed=0):
    rng = np.random.default_rng(seed)
    noise, init = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    noises = rng.standard_normal((plan.num_evaluations, *SHAPE)).astype(np.float32)
    return noise, init, noises


def check_parity(monkeypatch, name, config, n, *, karras=False, eta=0.0, start=0, tol=TOL):
    plan = samplers.make_plan(name, config, n, karras=karras, eta=eta, start_step=start)
    noise, init, noises = inputs(plan)
    ref = diffusers_trajectory(monkeypatch, name, config, n, noise, noises=noises, karras=karras,
                               eta=eta, start=start, init=init)
    run = jax.jit(lambda noise, init, noises: samplers.sample(
        name, model_jax, noise, config, n, karras=karras, eta=eta, start_step=start,
        init_latents=init if start else None, noises=noises, return_trajectory=True))
    final, trajectory = run(noise, init, noises)
    np.testing.assert_array_equal(final, trajectory[-1])
    start_latents = samplers.initial_latents(plan, noise, init if start else None)
    error = trajectory_error(trajectory, ref, start_latents)
    assert error < tol, f"{name}: trajectory error {error:.2e}"


def cases():
    """(sampler, config, num_steps, options): a covering set, not the full product."""
    def cfg(**kw):
        return {**SD15, **kw}

    out = []
    for name in samplers.SAMPLERS:  # Stable Diffusion 1.5's schedule, several step counts
        out += [(name, SD15, n, {}) for n in (4, 10, 25)]
    for name in samplers.SAMPLERS:  # SD 2.x: v-prediction; trailing spacing
        out.append((name, cfg(prediction_type="v_prediction", timestep_spacing="trailing"), 10, {}))
    for name in samplers.SAMPLERS:  # x0-prediction where diffusers has it; linspace spacing
        if name not in ("pndm", "euler_ancestral"):
            out.append((name, cfg(prediction_type="sample", timestep_spacing="linspace"), 7, {}))
    for name in samplers.KARRAS_SAMPLERS:
        out.append((name, SD15, 10, {"karras": True}))
        out.append((name, cfg(prediction_type="v_prediction", timestep_spacing="linspace"), 25,
                    {"karras": True}))
    for name in ("ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc",
                 "lcm"):  # zero terminal SNR (diffusers' Heun and PNDM lack the option)
        # Euler starts at sigma_max = sqrt(2^24 - 1), which torch's float32 sqrt rounds to
        # 4096 and a correctly rounded one to 4096 - 2^-12. The deterministic flow carries that
        # ulp (1e-3 on a starting state of 1.6e4) to the end: 2.5e-5 of the final state.
        options = {"tol": 5e-5} if name == "euler" else {}
        out.append((name, cfg(prediction_type="v_prediction", timestep_spacing="trailing",
                              rescale_betas_zero_snr=True), 10, options))
    out.append(("ddim", SD15, 10, {"eta": 0.5}))
    out.append(("ddim", cfg(prediction_type="v_prediction", timestep_spacing="linspace"), 7,
                {"eta": 1.0}))
    for name in ("ddpm", "pndm", "euler", "dpmpp_2m", "unipc"):  # the other beta schedules
        out.append((name, cfg(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 10, {}))
        out.append((name, cfg(beta_schedule="squaredcos_cap_v2"), 10, {}))
    return out


def case_id(case):
    name, config, n, options = case
    keys = [config["beta_schedule"], config["prediction_type"], config["timestep_spacing"]]
    keys += ["zsnr"] * bool(config.get("rescale_betas_zero_snr"))
    keys += [f"{k}={v}" for k, v in options.items() if k != "tol"]
    return "-".join([name, str(n), *keys])


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_trajectory_matches_diffusers(monkeypatch, case):
    name, config, n, options = case
    check_parity(monkeypatch, name, config, n, **options)


@pytest.mark.parametrize("name", [s for s in samplers.SAMPLERS if s != "pndm"])
def test_img2img_matches_diffusers(monkeypatch, name):
    start = samplers.img2img_start_step(10, 0.6)
    assert start == 4
    check_parity(monkeypatch, name, SD15, 10, start=start)


def test_pndm_img2img_restarts_plms(monkeypatch):
    """diffusers' img2img slices PNDM's duplicated PLMS list; ours restarts the warm-up at
    step `start`, which is diffusers' PNDMScheduler run on the remaining timesteps."""
    n, start = 10, 3
    plan = samplers.make_plan("pndm", SD15, n, start_step=start)
    noise, init, _ = inputs(plan)
    scheduler = reference_scheduler("pndm", SD15)
    scheduler.set_timesteps(n)
    remaining = samplers.make_plan("ddim", SD15, n).timesteps[start:].astype(np.int64)
    scheduler.timesteps = torch.from_numpy(np.concatenate([remaining[:2], remaining[1:]]))
    x = scheduler.add_noise(torch.from_numpy(init), torch.from_numpy(noise), scheduler.timesteps[:1])
    start_latents, ref = x.numpy(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model_torch(x, t), t, x).prev_sample
        ref.append(x.numpy())
    _, ours = samplers.sample("pndm", model_jax, noise, SD15, n, start_step=start,
                              init_latents=init, return_trajectory=True)
    assert trajectory_error(ours, np.stack(ref), start_latents) < TOL


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("n,strength", [(10, 0.75), (25, 0.3), (7, 1.0)])
def test_img2img_timesteps_match_get_timesteps(name, n, strength):
    scheduler = reference_scheduler(name, SD15)
    scheduler.set_timesteps(n)
    pipe = types.SimpleNamespace(scheduler=scheduler)
    timesteps, steps_left = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, n, strength, "cpu")
    start = samplers.img2img_start_step(n, strength)
    plan = samplers.make_plan(name, SD15, n, start_step=start)
    assert n - start == steps_left
    np.testing.assert_allclose(plan.timesteps, timesteps.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "unipc"])
def test_step_callback_inpainting_blend_matches_diffusers(monkeypatch, name):
    n = 8
    plan = samplers.make_plan(name, SD15, n)
    noise, init, _ = inputs(plan)
    mask = (np.arange(8) < 4).astype(np.float32).reshape(1, 1, 1, 8)  # 1 = repaint
    ref = diffusers_trajectory(monkeypatch, name, SD15, n, noise, init=init,
                               mask=torch.from_numpy(mask))

    def blend(x, step_index):
        known = samplers.noise_to_level(plan, init, noise, step_index + 1)
        return (1 - mask) * known + mask * x

    final, ours = jax.jit(lambda: samplers.sample(
        name, model_jax, noise, SD15, n, step_callback=blend, return_trajectory=True))()
    assert trajectory_error(ours, ref, samplers.initial_latents(plan, noise)) < TOL
    np.testing.assert_allclose(final[..., 4:], init[..., 4:], rtol=0, atol=0)


def test_loop_is_one_compiled_scan():
    traces = []

    def counting_model(x, t):
        traces.append(1)
        return model_jax(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def generate(noise):
        return samplers.sample("heun", counting_model, noise, SD15, 10)

    noise = jnp.ones(SHAPE)
    first, second = generate(noise), generate(noise * 0.5)
    assert len(traces) == 1  # the network is traced once for its 19 evaluations
    assert not np.allclose(first, second)
    jaxpr = jax.make_jaxpr(lambda x: samplers.sample("unipc", model_jax, x, SD15, 10))(noise)
    assert [e.primitive.name for e in jaxpr.eqns].count("scan") == 1
    assert not any(e.primitive.name == "while" for e in jaxpr.eqns)


def test_schedule_can_be_a_traced_argument():
    # Plans read only the schedule's static config, so a Schedule passed through jit works.
    schedule = Schedule.from_config(SD15)
    noise = jnp.ones(SHAPE)
    traced = jax.jit(lambda s, x: samplers.sample("dpmpp_2m", model_jax, x, s, 5))(schedule, noise)
    eager = samplers.sample("dpmpp_2m", model_jax, noise, SD15, 5)
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-6)  # jit fuses differently


def test_stochastic_samplers_draw_from_rng():
    noise = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)
    run = jax.jit(lambda rng: samplers.sample("euler_ancestral", model_jax, noise, SD15, 6, rng))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    with pytest.raises(ValueError, match="stochastic: pass rng or noises"):
        samplers.sample("ddpm", model_jax, noise, SD15, 6)
    with pytest.raises(ValueError, match=r"noises: expected shape \(6, 2, 4, 8, 8\)"):
        samplers.sample("lcm", model_jax, noise, SD15, 6, noises=jnp.zeros((5, *SHAPE)))


def test_plan_shapes_and_init_noise_sigma():
    assert samplers.make_plan("heun", SD15, 10).num_evaluations == 19
    assert samplers.make_plan("heun", SD15, 10, start_step=4).num_evaluations == 11
    assert samplers.make_plan("pndm", SD15, 10).num_evaluations == 11
    for name in samplers.SAMPLERS:
        scheduler = reference_scheduler(name, SD15)
        scheduler.set_timesteps(10)
        assert samplers.make_plan(name, SD15, 10).init_noise_sigma == pytest.approx(
            float(scheduler.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="k_lms"), r"unknown sampler 'k_lms'; valid samplers: \['ddpm', 'ddim', 'pndm'"),
    (dict(name="ddim", karras=True), "karras sigmas apply to"),
    (dict(name="euler", eta=0.5), "only ddim takes eta"),
    (dict(name="ddim", start_step=10), "start_step=10"),
    (dict(name="lcm", num_steps=60), "exceeds the 50 timesteps"),
    (dict(name="ddim", num_steps=0), "num_steps=0"),
])
def test_invalid_options_raise(kwargs, message):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        samplers.make_plan(kwargs.pop("name"), SD15, kwargs.pop("num_steps"), **kwargs)


def test_img2img_start_step_validation():
    with pytest.raises(ValueError, match="leaves none"):
        samplers.img2img_start_step(10, 0.05)
    with pytest.raises(ValueError, match="needs init_latents|pass init_latents"):
        samplers.sample("ddim", model_jax, jnp.zeros(SHAPE), SD15, 10, start_step=2)

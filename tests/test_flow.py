"""Rectified flow (diffusion/flow.py): whole sampler trajectories against diffusers' flow
schedulers, img2img noising, Flux's resolution shift, and the process functions.

Error as in test_samplers.py: max over evaluations of max|ours - diffusers| over
max(1, max|state|); bound 1e-5 in float32. The model is test_samplers' fixed nonlinear
function of (x, t).
"""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (compute_density_for_timestep_sampling,
                                      compute_loss_weighting_for_sd3)

from diffusion_jax.diffusion import flow, process, samplers
from test_samplers import model_jax, model_torch  # the same toy model as the DDPM samplers

SHAPE = (2, 4, 8, 8)
TOL = 1e-5
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
       "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
        "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096}


def noise(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def reference(name, config):
    """diffusers' scheduler for our sampler `name` on FlowMatch `config`, as a user swaps it
    in (`use_flow_sigmas`, `flow_shift`, `flow_prediction` for the multistep solvers)."""
    keys = {k: v for k, v in config.items() if not k.startswith("_")}
    if name == "flow_euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(**keys)
    if name == "flow_heun":
        return diffusers.FlowMatchHeunDiscreteScheduler(
            num_train_timesteps=keys["num_train_timesteps"], shift=keys["shift"])
    cls = {"dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
           "unipc": diffusers.UniPCMultistepScheduler}[name]
    return cls(use_flow_sigmas=True, flow_shift=keys["shift"], prediction_type="flow_prediction",
               use_dynamic_shifting=keys.get("use_dynamic_shifting", False))


def diffusers_trajectory(scheduler, n, x, *, start=0, init=None, **set_timesteps):
    scheduler.set_timesteps(n, **set_timesteps)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    x = torch.from_numpy(x)
    if init is not None:  # SD3 / Flux img2img: scale_noise at the first remaining timestep
        scheduler.set_begin_index(start * scheduler.order)
        if hasattr(scheduler, "scale_noise"):
            x = scheduler.scale_noise(torch.from_numpy(init), timesteps[:1], x)
        else:  # the multistep solvers' add_noise, on flow sigmas the same (1 - s) x0 + s eps
            x = scheduler.add_noise(torch.from_numpy(init), x, timesteps[:1])
    states = []
    for t in timesteps:
        x = scheduler.step(model_torch(x, t), t, x).prev_sample
        states.append(x.numpy())
    return np.stack(states), scheduler


def trajectory_error(ours, theirs):
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    return float(np.max(np.abs(ours - theirs)) / max(1.0, np.abs(theirs).max()))


CASES = [  # (sampler, config, steps, our make_plan options = diffusers' set_timesteps options)
    ("flow_euler", SD3, 10, {}),
    ("flow_euler", FLUX, 12, {"mu": calculate_shift(1024), "sigmas": np.linspace(1, 1 / 12, 12)}),
    ("flow_euler", {**SD3, "shift_terminal": 0.1}, 8, {}),
    ("flow_euler", {**FLUX, "time_shift_type": "linear"}, 6, {"mu": 1.3}),
    ("flow_heun", SD3, 10, {}),
    ("dpmpp_2m", SD3, 10, {}),
    ("dpmpp_2m", FLUX, 20, {"mu": 0.9}),
    ("unipc", SD3, 10, {}),
    ("unipc", FLUX, 20, {"mu": 0.9}),
]


@pytest.mark.parametrize("name, config, n, options", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_trajectory_matches_diffusers(name, config, n, options):
    theirs, scheduler = diffusers_trajectory(reference(name, config), n, noise(), **options)
    plan = samplers.make_plan(name, config, n, **options)
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=1e-6)
    _, ours = samplers.run(plan, model_jax, jnp.asarray(noise()), return_trajectory=True)
    assert trajectory_error(ours, theirs) < TOL


@pytest.mark.parametrize("name", ["flow_euler", "dpmpp_2m"])
def test_img2img_noising_and_trajectory_match_diffusers(name):
    n, start = 10, 4
    init = noise(1)
    theirs, _ = diffusers_trajectory(reference(name, SD3), n, noise(), start=start, init=init)
    plan = samplers.make_plan(name, SD3, n, start_step=start)
    x = samplers.initial_latents(plan, jnp.asarray(noise()), jnp.asarray(init))
    _, ours = samplers.run(plan, model_jax, x, return_trajectory=True)
    assert trajectory_error(ours, theirs) < TOL


def test_resolution_mu_is_calculate_shift():
    config = flow.FlowConfig.from_dict(FLUX)
    for seq_len in (256, 1024, 4096, 6000):
        assert flow.resolution_mu(config, seq_len) == pytest.approx(calculate_shift(seq_len),
                                                                    rel=1e-12)


def test_the_process_is_x_t_equals_one_minus_t_x0_plus_t_eps():
    p = process.from_config(SD3)
    assert isinstance(p, flow.FlowProcess) and p.prediction_type == "flow"
    rng = np.random.default_rng(0)
    x0, eps = (jnp.asarray(rng.standard_normal((3, 4, 2, 2)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    tt = t[:, None, None, None]
    np.testing.assert_allclose(jax.jit(process.add_noise)(p, x0, eps, t),
                               (1 - tt) * x0 + tt * eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(process.training_target(p, x0, eps, t), eps - x0, atol=1e-6)
    np.testing.assert_allclose(process.model_time(p, t), t * 1000, rtol=1e-6)
    np.testing.assert_allclose(process.snr(p, t), ((1 - t) / t) ** 2, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_training_times_follow_the_sd3_densities_then_the_shift(scheme):
    """Our draws against diffusers' `compute_density_for_timestep_sampling` (SD3 training),
    shifted by SD3's shift 3 as its scripts' sigmas are: two-sample KS distance."""
    count = 20_000
    config = {**SD3, "time_sampling": scheme, "logit_mean": 0.0, "logit_std": 1.0,
              "mode_scale": 1.29}
    ours = np.sort(np.asarray(process.sample_time(process.from_config(config),
                                                  jax.random.PRNGKey(0), (count,))))
    u = compute_density_for_timestep_sampling(scheme, count, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(0)).numpy()
    theirs = np.sort(3 * u / (1 + 2 * u))
    grid = np.linspace(0, 1, 201)
    ks = np.max(np.abs(np.searchsorted(ours, grid) - np.searchsorted(theirs, grid))) / count
    assert ks < 0.02  # 1.36 * sqrt(2 / n) = 0.0136 at the 5% level
    assert ours.min() > 0 and ours.max() <= 1


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weightings_are_diffusers_sd3_ones_and_the_loss_applies_them(scheme):
    from diffusion_jax import system
    from diffusion_jax.configs import tiny_flow_train
    from diffusion_jax.training import losses

    sigmas = np.linspace(0.001, 1.0, 50, dtype=np.float32)
    p = process.from_config({**SD3, "loss_weighting": scheme})
    theirs = compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas)).numpy()
    np.testing.assert_allclose(process.loss_weight(p, jnp.asarray(sigmas)), theirs, rtol=1e-6)
    # The training loss: the per-example squared errors times these weights (mse: without).
    config = tiny_flow_train.get_config()
    config.schedule.loss_weighting = scheme
    described = system.from_config(config)
    models = system.build(described, config)
    params = system.init_params(described, config, seed=0)
    loss_fn = losses.diffusion_loss_fn(models, process.from_config(config.schedule.to_dict()))
    batch = {"latents": np.random.default_rng(0).standard_normal(
        (8, 8, 8, config.vae.latent_channels)).astype(np.float32),
        **system.text_inputs(described, config)(["a photo of a bag"] * 8)}
    loss, metrics = loss_fn({n: params[n] for n in ("transformer",)},
                            {n: v for n, v in params.items() if n != "transformer"}, batch,
                            jax.random.key(0))
    assert (float(loss) == float(metrics["mse"])) == (scheme == "none")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="euler", schedule=SD3), "a flow-matching schedule samples with"),
    (dict(name="flow_euler", schedule={"beta_schedule": "scaled_linear"}), "only for a flow-matching"),
    (dict(name="flow_euler", schedule=FLUX), "pass mu"),
    (dict(name="flow_euler", schedule=SD3, karras=True), "karras sigmas are not supported"),
    (dict(name="unipc", schedule=SD3, sigmas=np.linspace(1, 0.1, 10)), "only flow_euler and flow_heun"),
    (dict(name="flow_euler", schedule={**SD3, "stochastic_sampling": True}), "stochastic_sampling=True"),
    (dict(name="flow_euler", schedule={**SD3, "prediction_type": "epsilon"}), "predicts the flow"),
    (dict(name="flow_euler", schedule=SD3, sigmas=np.linspace(1, 0.1, 9)), "9 values for 10 steps"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        samplers.make_plan(kwargs.pop("name"), kwargs.pop("schedule"), 10, **kwargs)
    assert "\n" not in str(info.value)


def test_flow_config_round_trips_diffusers_keys():
    config = flow.FlowConfig.from_dict(FLUX)
    saved = config.to_dict()
    assert "time_sampling" not in saved
    assert diffusers.FlowMatchEulerDiscreteScheduler(**saved).config.use_dynamic_shifting
    assert flow.FlowConfig.from_dict(saved) == config
    assert math.isclose(flow.inference_sigmas(config, 4, mu=0.0)[0], 1.0)


@pytest.mark.parametrize("n", [5, 10, 28])
def test_img2img_start_step_rounds_as_the_flow_pipelines(n):
    for strength in np.linspace(0.05, 1.0, 20):
        init_timestep = min(n * strength, n)  # SD3 / Flux img2img get_timesteps
        expected = int(max(n - init_timestep, 0))
        if expected >= n:
            continue
        assert samplers.img2img_start_step(n, float(strength), flow=True) == expected


def test_scheduler_config_is_written_and_read_as_flow_match(tmp_path):
    from diffusion_jax import system
    from diffusion_jax.convert import diffusers as convert_diffusers

    kind = convert_diffusers.PIPELINE_KINDS[system.STABLE_DIFFUSION]
    written = convert_diffusers.scheduler_config_json(FLUX, kind)
    assert written["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(written)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 1.15
    (tmp_path / "scheduler").mkdir()
    scheduler.save_config(tmp_path / "scheduler")
    read = convert_diffusers.read_schedule(tmp_path)
    assert flow.FlowConfig.from_dict(read) == flow.FlowConfig.from_dict(FLUX)
    assert isinstance(process.from_config(read), flow.FlowProcess)

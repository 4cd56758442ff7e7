"""Noise schedule and forward process against diffusers' PyTorch schedulers.

Errors are max|ours - diffusers| / max(1, max|diffusers|) unless stated otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import diffusers
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from diffusion_jax.configs import sd15
from diffusion_jax.diffusion import schedule as sch

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]

# The scheduler_config.json of runwayml/stable-diffusion-v1-5 (diffusers 0.6.0), verbatim.
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def config(beta_schedule="scaled_linear", **kw):
    return dict(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=0.00085,
                beta_end=0.012, **kw)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_betas_alphas_cumprod_sigmas_match_diffusers(beta_schedule, zero_snr):
    cfg = config(beta_schedule, rescale_betas_zero_snr=zero_snr)
    ours = sch.Schedule.from_config(cfg)
    ddpm = diffusers.DDPMScheduler(**cfg)
    euler = diffusers.EulerDiscreteScheduler(**cfg)
    # diffusers accumulates the cumprod in float32 (relative error ~1e-6); ours in float64.
    # Its zero-SNR rescale, also float32, loses up to 4e-3 of the small betas, so the rescaled
    # betas are checked against diffusers' algorithm run in float64.
    betas = diffusers.DDPMScheduler(**{**cfg, "rescale_betas_zero_snr": False}).betas.double()
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    np.testing.assert_allclose(ours.betas, betas.numpy(), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ddpm.alphas_cumprod.numpy(), rtol=5e-6,
                               atol=1e-9 if zero_snr else 0)
    # EulerDiscreteScheduler.sigmas before set_timesteps: descending training sigmas, then 0.
    # sigma of a float32 abar is ill-conditioned at both ends: near t = 0 (1 - abar ~ 1e-5,
    # one ulp of abar moves sigma ~1e-5) and, for the rescaled schedules, near t = T - 1,
    # where diffusers' float32 cumprod is itself off by up to 4e-5.
    np.testing.assert_allclose(ours.sigmas, euler.sigmas.numpy()[:-1][::-1], rtol=5e-5, atol=2e-5)
    if zero_snr:
        assert float(ours.alphas_cumprod[-1]) == 0.0
        assert float(ours.sigmas[-1]) == pytest.approx(4096.0, rel=1e-6)
    from diffusers.training_utils import compute_snr
    # Where abar is within 1e-2 of 0 or 1 the SNR of a float32 abar is ill-conditioned.
    abar = ddpm.alphas_cumprod.numpy()
    t = torch.from_numpy(np.flatnonzero((abar > 0.01) & (abar < 0.99)))
    np.testing.assert_allclose(ours.snr[t.numpy()], compute_snr(ddpm, t).numpy(), rtol=1e-4)


def test_trained_betas_are_used_verbatim():
    betas = np.linspace(1e-4, 2e-2, 50)
    ours = sch.Schedule.from_config(dict(num_train_timesteps=50, trained_betas=betas.tolist()))
    ref = diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)


@pytest.mark.parametrize("beta_schedule,zero_snr", [("scaled_linear", False),
                                                    ("squaredcos_cap_v2", False),
                                                    ("scaled_linear", True)])
def test_add_noise_and_velocity_match_diffusers(beta_schedule, zero_snr):
    cfg = config(beta_schedule, rescale_betas_zero_snr=zero_snr)
    ours, ref = sch.Schedule.from_config(cfg), diffusers.DDPMScheduler(**cfg)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((5, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = np.array([0, 1, 500, 998, 999])
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    noisy = sch.add_noise(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert rel_err(noisy, ref.add_noise(tx0, tnoise, tt)) < 1e-6
    v = sch.velocity(ours, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert rel_err(v, ref.get_velocity(tx0, tnoise, tt)) < 1e-6


@pytest.mark.parametrize("prediction_type", sch.PREDICTION_TYPES)
def test_training_target_per_prediction_type(prediction_type):
    s = sch.Schedule.from_config(config(prediction_type=prediction_type))
    rng = np.random.default_rng(1)
    x0, noise = (jnp.asarray(rng.standard_normal((3, 4, 4, 4)), jnp.float32) for _ in range(2))
    t = jnp.array([3, 400, 999])
    target = sch.training_target(s, x0, noise, t)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": sch.velocity(s, x0, noise, t)}[prediction_type]
    np.testing.assert_array_equal(target, expected)


@pytest.mark.parametrize("prediction_type", sch.PREDICTION_TYPES)
def test_prediction_conversions_invert_each_other(prediction_type):
    # Zero terminal SNR puts t = 999 at alpha = 0, where only v-prediction is well posed.
    s = sch.Schedule.from_config(config(rescale_betas_zero_snr=True))
    t = jnp.array([0, 250, 700, 998] + ([999] if prediction_type == "v_prediction" else []))
    rng = np.random.default_rng(2)
    x0, eps = (jnp.asarray(rng.standard_normal((len(t), 4, 4, 4)), jnp.float32) for _ in range(2))
    alpha, sigma = (a[:, None, None, None] for a in sch.alpha_sigma(s, t))
    x_t = alpha * x0 + sigma * eps
    pred = sch.x0_eps_to_prediction(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = sch.prediction_to_x0_eps(pred, x_t, alpha, sigma, prediction_type)
    # Reading eps from an x0 prediction divides by sigma (small at t = 0), and vice versa.
    tol = {"epsilon": 2e-4, "sample": 2e-3, "v_prediction": 1e-5}[prediction_type]
    assert rel_err(x0_back, x0) < tol and rel_err(eps_back, eps) < tol
    with pytest.raises(ValueError, match="epsilon"):
        sch.prediction_to_x0_eps(pred, x_t, alpha, sigma, "flow")


def test_posterior_matches_ddpm_step(monkeypatch):
    cfg = config(prediction_type="sample", clip_sample=False)
    ref = diffusers.DDPMScheduler(**cfg)
    ours = sch.Schedule.from_config(cfg)
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **kw: torch.zeros(shape))
    rng = np.random.default_rng(3)
    x0, x_t = (rng.standard_normal((1, 4, 4, 4)).astype(np.float32) for _ in range(2))
    for t in (1, 10, 500, 999):
        # Noise replaced by zeros: DDPMScheduler.step returns the posterior mean.
        mean_ref = ref.step(torch.from_numpy(x0), t, torch.from_numpy(x_t)).prev_sample
        mean, var = sch.posterior_mean_variance(ours, jnp.asarray(x0), jnp.asarray(x_t), jnp.array([t]))
        assert rel_err(mean, mean_ref) < 1e-6
        np.testing.assert_allclose(var, ref._get_variance(t).numpy(), rtol=1e-5)
    _, var0 = sch.posterior_mean_variance(ours, jnp.asarray(x0), jnp.asarray(x_t), jnp.array([0]))
    assert float(var0[0]) == 0.0  # t = 0 denoises to the clean sample


def test_schedule_is_a_pytree_under_jit_and_vmap():
    s = sch.Schedule.from_config(config())
    assert len(jax.tree_util.tree_leaves(s)) == 2
    x0, noise = jnp.ones((3, 2, 2, 4)), jnp.full((3, 2, 2, 4), 0.5)
    t = jnp.array([0, 10, 999])
    jitted = jax.jit(sch.add_noise)(s, x0, noise, t)
    vmapped = jax.vmap(sch.add_noise, in_axes=(None, 0, 0, 0))(s, x0, noise, t)
    np.testing.assert_allclose(jitted, sch.add_noise(s, x0, noise, t), rtol=1e-6)
    np.testing.assert_allclose(vmapped, jitted, rtol=1e-6)


def test_from_dict_reads_diffusers_json_and_sd15_config():
    from_json = sch.ScheduleConfig.from_dict(SD15_SCHEDULER_JSON)
    from_config = sch.ScheduleConfig.from_dict(sd15.get_config().schedule)
    assert from_json == from_config == sch.ScheduleConfig(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    assert sch.ScheduleConfig.from_dict(from_json.to_dict()) == from_json
    # A full config as a newer diffusers writes it (all DDIMScheduler keys).
    ddim_keys = dict(diffusers.DDIMScheduler.from_config(SD15_SCHEDULER_JSON).config)
    assert sch.ScheduleConfig.from_dict(ddim_keys) == from_json


@pytest.mark.parametrize("update,message", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule.*'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
    ({"prediction_type": "flow"}, "prediction_type.*'epsilon', 'v_prediction', 'sample'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing.*'leading', 'trailing', 'linspace'"),
    ({"clip_sample": True}, "clip_sample=True is not supported"),
    ({"beta_shedule": "linear"}, "unknown key 'beta_shedule'.*beta_schedule"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values"),
])
def test_from_dict_rejects_unsupported_values(update, message):
    with pytest.raises(ValueError, match=message):
        sch.ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, **update})

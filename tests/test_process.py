"""The noise-process interface: the DDPM table through it, the general prediction
conversions, and a new process defined here, outside the library."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import schedule as sch

SD15 = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
            beta_end=0.012, steps_offset=1)


def samples(seed, shape=(4, 3, 3, 2)):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))


def table_reference(schedule, x0, noise, t):
    """The pre-process table arithmetic (schedule.py at d782e30), written out."""
    abar = schedule.alphas_cumprod[t]
    alpha, sigma = jnp.sqrt(abar)[:, None, None, None], jnp.sqrt(1 - abar)[:, None, None, None]
    target = {"epsilon": noise, "v_prediction": alpha * noise - sigma * x0,
              "sample": x0}[schedule.prediction_type]
    snr = (schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))[t]
    return alpha * x0 + sigma * noise, target, snr


@pytest.mark.parametrize("prediction_type", sch.PREDICTION_TYPES)
def test_ddpm_process_equals_the_table_bitwise(prediction_type):
    schedule = process.from_config({**SD15, "prediction_type": prediction_type})
    assert isinstance(schedule, sch.Schedule)
    rng = jax.random.PRNGKey(7)
    t = process.sample_time(schedule, rng, (4,))
    # The loss's draw before the interface: training is bitwise unchanged.
    np.testing.assert_array_equal(t, jax.random.randint(rng, (4,), 0, 1000))
    assert t.dtype == jnp.int32
    np.testing.assert_array_equal(process.model_time(schedule, t), t)
    x0, noise = samples(0)
    x_t, target, snr = table_reference(schedule, x0, noise, t)
    np.testing.assert_array_equal(process.add_noise(schedule, x0, noise, t), x_t)
    np.testing.assert_array_equal(process.training_target(schedule, x0, noise, t), target)
    np.testing.assert_array_equal(process.snr(schedule, t), snr)
    np.testing.assert_array_equal(process.snr(schedule, t), schedule.snr[t])
    # The table's module functions are the process's.
    np.testing.assert_array_equal(sch.add_noise(schedule, x0, noise, t), x_t)
    np.testing.assert_array_equal(sch.training_target(schedule, x0, noise, t), target)
    # Under jit, the process is an argument like any pytree.
    jitted = jax.jit(process.add_noise)(schedule, x0, noise, t)
    np.testing.assert_allclose(jitted, x_t, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", sch.PREDICTION_TYPES)
def test_min_snr_weight_is_the_loss_weighting(prediction_type):
    # diffusion_jax/training/losses.py's min_snr_weight at d782e30, bitwise.
    snr = sch.Schedule.from_config(SD15).snr[jnp.array([0, 1, 10, 250, 500, 999])]
    clipped = jnp.minimum(snr, 5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0),
                "sample": clipped}[prediction_type]
    np.testing.assert_array_equal(process.min_snr_weight(snr, 5.0, prediction_type), expected)


def test_min_snr_weight_of_a_flow_is_the_x0_space_weight():
    # x_t = (1 - t) x0 + t eps: x0 = x_t - t v, so an error in v is t times one in x0.
    t = jnp.array([0.1, 0.5, 0.9])
    snr = jnp.square(1 - t) / jnp.square(t)
    weight = process.min_snr_weight(snr, 2.0, "flow")
    np.testing.assert_allclose(weight, jnp.minimum(snr, 2.0) * t**2, rtol=1e-5)
    with pytest.raises(ValueError, match="'flow'"):
        process.min_snr_weight(snr, 2.0, "score")



@pytest.mark.parametrize("prediction_type", process.PREDICTION_TYPES)
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_prediction_conversions_round_trip(prediction_type, kind):
    if kind == "flow":  # alpha^2 + sigma^2 != 1 away from the ends
        t = jnp.array([0.05, 0.3, 0.5, 0.95])
        alpha, sigma = 1 - t, t
        assert float(jnp.abs(alpha**2 + sigma**2 - 1).max()) > 0.4
    else:
        t = jnp.array([20, 300, 700, 999])
        alpha, sigma = sch.alpha_sigma(sch.Schedule.from_config(SD15), t)
    alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
    x0, eps = samples(1)
    x_t = alpha * x0 + sigma * eps
    pred = process.x0_eps_to_prediction(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = process.prediction_to_x0_eps(pred, x_t, alpha, sigma, prediction_type)
    np.testing.assert_allclose(x0_back, x0, atol=2e-4 if prediction_type == "epsilon" else 1e-5)
    np.testing.assert_allclose(eps_back, eps, atol=2e-4 if prediction_type == "sample" else 1e-5)


def test_flow_velocity_is_the_time_derivative():
    x0, eps = samples(2)
    t, dt = 0.4, 1e-3
    path = lambda s: (1 - s) * x0 + s * eps
    v = process.x0_eps_to_prediction(x0, eps, 1 - t, t, "flow")
    np.testing.assert_allclose(v, (path(t + dt) - path(t - dt)) / (2 * dt), atol=1e-3)
    # At t = 1 (pure noise) and t = 0 (clean) the flow's conversion stays finite.
    for s in (0.0, 1.0):
        x0_back, eps_back = process.prediction_to_x0_eps(eps - x0, path(s), 1 - s, s, "flow")
        np.testing.assert_allclose(x0_back, x0, atol=1e-6)
        np.testing.assert_allclose(eps_back, eps, atol=1e-6)


def test_v_prediction_at_zero_terminal_snr():
    schedule = sch.Schedule.from_config({**SD15, "rescale_betas_zero_snr": True})
    alpha, sigma = sch.alpha_sigma(schedule, jnp.array([999]))
    assert float(alpha[0]) == 0.0
    x0, eps = samples(3, (1, 4))
    v = process.x0_eps_to_prediction(x0, eps, alpha[:, None], sigma[:, None], "v_prediction")
    x0_back, _ = process.prediction_to_x0_eps(v, sigma[:, None] * eps, alpha[:, None],
                                               sigma[:, None], "v_prediction")
    np.testing.assert_allclose(x0_back, x0, atol=1e-6)


def test_table_conversion_is_the_general_one_on_ddpm():
    schedule = sch.Schedule.from_config(SD15)
    t = jnp.array([1, 400, 800, 999])
    alpha, sigma = (a[:, None, None, None] for a in sch.alpha_sigma(schedule, t))
    x0, eps = samples(4)
    x_t = alpha * x0 + sigma * eps
    for prediction_type in sch.PREDICTION_TYPES:
        pred = process.x0_eps_to_prediction(x0, eps, alpha, sigma, prediction_type)
        ours = sch.prediction_to_x0_eps(pred, x_t, alpha, sigma, prediction_type)
        general = process.prediction_to_x0_eps(pred, x_t, alpha, sigma, prediction_type)
        for a, b in zip(ours, general):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_from_config_refuses_flow_sigmas_in_one_line():
    with pytest.raises(ValueError, match="use_flow_sigmas=True is not supported") as info:
        process.from_config({**SD15, "use_flow_sigmas": True})
    assert "\n" not in str(info.value)


# A process the library does not know: a variance-preserving cosine schedule in float time.

@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["prediction_type"])
@dataclasses.dataclass(frozen=True)
class CosineProcess:
    prediction_type: str = "v_prediction"


@process.sample_time.register
def _(p: CosineProcess, rng, batch_shape):
    return jax.random.uniform(rng, batch_shape)


@process.alpha_sigma.register
def _(p: CosineProcess, t):
    return jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)


@process.model_time.register
def _(p: CosineProcess, t):
    return t * 1000


@pytest.mark.parametrize("prediction_type", process.PREDICTION_TYPES)
def test_a_new_process_works_through_the_interface(prediction_type):
    p = CosineProcess(prediction_type)
    t = process.sample_time(p, jax.random.PRNGKey(0), (4,))
    assert t.dtype == jnp.float32 and bool(jnp.all((t >= 0) & (t < 1)))
    np.testing.assert_allclose(process.model_time(p, t), t * 1000)
    x0, noise = samples(5)
    x_t = jax.jit(process.add_noise)(p, x0, noise, t)
    c, s = (f(0.5 * jnp.pi * t)[:, None, None, None] for f in (jnp.cos, jnp.sin))
    np.testing.assert_allclose(x_t, c * x0 + s * noise, rtol=1e-6, atol=1e-6)
    target = process.training_target(p, x0, noise, t)
    # The target reads back to (x0, noise) at x_t: the loss and the samplers agree on it.
    x0_back, noise_back = process.prediction_to_x0_eps(target, x_t, c, s, prediction_type)
    np.testing.assert_allclose(x0_back, x0, atol=1e-4)
    np.testing.assert_allclose(noise_back, noise, atol=1e-4)
    # snr falls back to alpha^2 / sigma^2 = cot^2.
    cot2 = 1 / jnp.square(jnp.tan(0.5 * jnp.pi * t))
    np.testing.assert_allclose(process.snr(p, t), cot2, rtol=1e-4)


def test_an_unregistered_process_is_named():
    with pytest.raises(NotImplementedError, match="alpha_sigma is not registered for object"):
        process.add_noise(object(), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))

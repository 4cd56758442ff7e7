"""The train state and the one pure training step.

`TrainState` holds what changes during a stage: the trained params, optimizer state, EMA
params (of all trained params or of the part `ema_select` picks), the micro-step counter, the run's base rng, and the first step whose loss or
gradients were not finite (-1 while none). Frozen towers (the VAE in stage 2, the text
encoder unless trained) are a separate argument, never donated, never updated.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training.losses import LossFn

Metrics = dict[str, jax.Array]
EmaSelect = Callable[[Any], Any]  # trained params -> the part that keeps an EMA copy


def _all(params: Any) -> Any:
    return params


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # micro-batches consumed (= optimizer steps without accumulation)
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # raw uint32 key: per-step keys are fold_in(rng, step)
    nonfinite_step: jax.Array  # first step with a NaN/Inf loss or gradient; -1: none

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
               use_ema: bool = True, ema_select: EmaSelect | None = None) -> "TrainState":
        ema = jax.tree.map(jnp.copy, (ema_select or _all)(params)) if use_ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params), ema_params=ema, rng=rng,
                   nonfinite_step=jnp.full((), -1, jnp.int32))


def ema_decay(optimizer_step: jax.Array, max_decay: float) -> jax.Array:
    """diffusers' EMAModel warm-up at the n-th optimizer update (n >= 1): 0 at the first, so
    EMA starts from the trained params, then min(max_decay, n / (9 + n)) (its
    (1 + s) / (10 + s) with s = n - 1): early EMA tracks the fast-changing params."""
    s = optimizer_step.astype(jnp.float32) - 1.0
    return jnp.where(s <= 0, 0.0, jnp.minimum(max_decay, (1.0 + s) / (10.0 + s)))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    learning_rate: optax.Schedule, *, ema_max_decay: float | None,
                    gradient_accumulation: int = 1, ema_select: EmaSelect | None = None
                    ) -> Callable[[TrainState, Mapping, Mapping], tuple[TrainState, Metrics]]:
    """train_step(state, frozen, batch) -> (state, metrics); pure, for `jax.jit`.

    `ema_max_decay` None: the state keeps no EMA params; else EMA copies of
    `ema_select(params)` (default: all of them). A non-finite loss or gradient leaves
    params, optimizer and EMA as they were and records the
    step in `nonfinite_step`, so the trainer can stop with the last good weights."""

    def train_step(state: TrainState, frozen: Mapping, batch: Mapping
                   ) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, rng)
        grad_norm = optax.tree.norm(grads)  # NaN/Inf in any gradient makes it non-finite
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema_params
            if ema_max_decay is not None:
                optimizer_step = (state.step + 1) // gradient_accumulation
                decay = ema_decay(optimizer_step, ema_max_decay)
                if gradient_accumulation > 1:  # move only when the optimizer did
                    decay = jnp.where((state.step + 1) % gradient_accumulation == 0, decay, 1.0)
                ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema,
                                   (ema_select or _all)(params))
            return params, opt_state, ema

        # lax.cond, not a per-leaf jnp.where: XLA CPU compiles the selects 5x slower.
        params, opt_state, ema = jax.lax.cond(
            finite, update, lambda _: (state.params, state.opt_state, state.ema_params), None)
        new_state = TrainState(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
            rng=state.rng,
            nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite,
                                     state.step, state.nonfinite_step))
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": learning_rate(state.step // gradient_accumulation), **aux}
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn) -> Callable[[Any, Mapping, Mapping, jax.Array], Metrics]:
    """eval_step(params, frozen, batch, rng) -> metrics (the loss at fixed randomness)."""

    def eval_step(params, frozen, batch, rng):
        loss, aux = loss_fn(params, frozen, batch, rng)
        return {"loss": loss, **aux}

    return eval_step

"""AdamW with warm-up + cosine/constant learning rate, global-norm clipping and gradient
accumulation, all from a config section (`vae_training` or `training`)."""

from __future__ import annotations

from typing import Any, Mapping

import optax


def learning_rate_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to 0 at `total_steps`
    (optimizer steps, i.e. after gradient accumulation)."""
    peak, warmup = cfg["learning_rate"], min(cfg.get("warmup_steps", 0), total_steps)
    kind = cfg.get("lr_schedule", "cosine")
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.constant_schedule(peak)], [warmup])
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
    raise ValueError(f"lr_schedule {kind!r} is not supported; use 'cosine' or 'constant'")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule). With `gradient_accumulation` k > 1 the optimizer
    is an `optax.MultiSteps`: each call takes one micro-batch and the update lands every k."""
    accumulation = cfg.get("gradient_accumulation", 1)
    if accumulation < 1:
        raise ValueError(f"gradient_accumulation must be >= 1, got {accumulation}")
    schedule = learning_rate_schedule(cfg, total_steps // accumulation)
    clip = cfg.get("grad_clip_norm", 0.0)
    optimizer = optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(schedule, b1=cfg.get("adam_b1", 0.9), b2=cfg.get("adam_b2", 0.999),
                    weight_decay=cfg.get("weight_decay", 0.0)),
    )
    if accumulation > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulation)
    return optimizer, schedule


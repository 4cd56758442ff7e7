"""A toy model family, registered by tests/test_system.py only: a denoiser that reads a
pooled text embedding beside the context, as SDXL's and Flux's do. It exists to show that a
family plugs into the pipeline and the trainer through the system description alone."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import timestep_embedding


@dataclasses.dataclass(frozen=True)
class ToyDenoiserConfig:
    in_channels: int = 4
    out_channels: int = 4
    context_dim: int = 32  # features of cond["context"]
    pooled_dim: int = 16  # features of cond["pooled"]
    width: int = 16
    sample_size: int = 8
    downsampling: int = 1  # no levels: any latent side

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ToyDenoiserConfig":
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ToyDenoiser(nn.Module):
    config: ToyDenoiserConfig
    dtype: Any = jnp.float32
    remat_policy: str | None = None
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, t, context, pooled):
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        embedding = (nn.Dense(cfg.width, name="time")(timestep_embedding(t, cfg.width))
                     + nn.Dense(cfg.width, name="pooled")(pooled)
                     + nn.Dense(cfg.width, name="context")(context.mean(axis=1)))
        h = nn.Conv(cfg.width, (3, 3), name="conv_in")(x)
        h = nn.silu(h + embedding[:, None, None, :])
        return nn.Conv(cfg.out_channels, (3, 3), name="conv_out")(h).astype(jnp.float32)


def init_params(config: ToyDenoiserConfig, rng: jax.Array) -> dict:
    x = jnp.zeros((1, 8, 8, config.in_channels))
    context = jnp.zeros((1, 1, config.context_dim))
    pooled = jnp.zeros((1, config.pooled_dim))
    return ToyDenoiser(config).init(rng, x, jnp.zeros((1,)), context, pooled)["params"]


def denoise(model: ToyDenoiser, params: dict, x, t, cond: dict):
    return model.apply({"params": params}, x, t, cond["context"], cond["pooled"])

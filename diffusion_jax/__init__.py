"""diffusion_jax: latent diffusion (Stable Diffusion family) in JAX/Flax."""

from diffusion_jax import xla_defaults

xla_defaults.apply()  # before any JAX backend starts: XLA reads XLA_FLAGS once per process

__version__ = "0.1.0"

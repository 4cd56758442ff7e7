"""diffusion_jax: latent diffusion (Stable Diffusion family) in JAX/Flax."""

__version__ = "0.1.0"

"""`python -m diffusion_jax.cli`: the same as the `diffusion-jax` command."""

import sys

from diffusion_jax.cli import main

sys.exit(main())

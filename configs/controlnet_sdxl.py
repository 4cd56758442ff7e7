"""An SDXL ControlNet (diffusers/controlnet-*-sdxl-1.0): `ControlNetModel.from_unet` of the
SDXL base U-Net (text_time micro-conditioning, 1/2/10 transformer blocks), 1,251,014,160
parameters. A system of the ControlNet alone, as configs/controlnet_sd15.py."""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import sdxl_base
from diffusion_jax.configs.controlnet_sd15 import controlnet_of


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.system = system.CONTROLNET.to_dict()
    config.controlnet = controlnet_of(sdxl_base.get_config().unet.to_dict())
    return config

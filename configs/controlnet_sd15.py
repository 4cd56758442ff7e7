"""The SD 1.5 ControlNet (lllyasviel/sd-controlnet-*, control_v11p_sd15_*): diffusers'
`ControlNetModel.from_unet` of the SD 1.5 U-Net, 361,279,120 parameters.

Architecture only, a system of the ControlNet alone (as `convert` writes one): the section
uses the diffusers ControlNetModel config.json key names."""

import ml_collections

from diffusion_jax import system
from diffusion_jax.configs import sd15
from diffusion_jax.models.controlnet import ControlNetConfig
from diffusion_jax.models.unet import UNetConfig


def controlnet_of(unet: dict, **options) -> dict:
    """The ControlNet section of a U-Net section: its encoder half's keys, as from_unet."""
    return ControlNetConfig.from_unet(UNetConfig.from_dict(unet), **options).to_dict()


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.system = system.CONTROLNET.to_dict()  # one `controlnet` model, no base
    # The U-Net's encoder half (same keys as unet: in_channels, block_out_channels, ...) and:
    #   conditioning_channels=3: an RGB control image in [0, 1], 8x the latent side;
    #   conditioning_embedding_out_channels=(16, 32, 96, 256): its conv net, stride 2 between;
    #   controlnet_conditioning_channel_order="rgb" ("bgr": flipped on input);
    #   global_pool_conditions=False (True: residuals averaged over space, the shuffle model).
    config.controlnet = controlnet_of(sd15.get_config().unet.to_dict())
    return config

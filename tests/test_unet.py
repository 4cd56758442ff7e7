"""U-Net: parity with diffusers' PyTorch UNet2DConditionModel, SD parameter counts, bf16,
remat, and config / input errors. Relative error = max|ours - ref| / max(1, max|ref|)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.configs import sd15, sd21, tiny
from diffusion_jax.convert.torch_params import state_dict_to_params
from diffusion_jax.models.layers import REMAT_POLICIES
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig, init_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SD 1.x shape: 1x1 conv projections, one head count for every block, two layers per block.
SD1_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=2,
    cross_attention_dim=16, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)
# SD 2.x inpainting shape: Dense projections, heads per block, fp32 attention, text width
# unlike any channel count, 9 input channels (latents + mask + masked-image latents).
SD2_TINY = dict(
    sample_size=8, in_channels=9, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4),
    cross_attention_dim=24, use_linear_projection=True, upcast_attention=True,
    norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
)
# The smallest U-Net with every kind of block (down, mid, up) holding attention: for remat,
# whose gradient compiles are the slowest thing here.
ONE_LEVEL = dict(SD1_TINY, down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(16,),
                 layers_per_block=1)
# SDXL shape: no attention at the top level, 1 then 2 transformer blocks per attention layer
# (10 in the mid block of the real one), and "text_time" micro-conditioning: a pooled text
# embedding (12 wide) and six size/crop numbers, 8 sinusoid channels each.
SDXL_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4),
    cross_attention_dim=24, use_linear_projection=True, transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=12 + 6 * 8, norm_num_groups=8,
)
SDXL_POOLED = 12
CONFIGS = {"SD1": SD1_TINY, "SD2": SD2_TINY, "ONE_LEVEL": ONE_LEVEL, "SDXL": SDXL_TINY}
SD1_SHAPE = (2, 12, 8)  # batch, height, width: not square, a multiple of 4 (two downsamplings)
SD2_SHAPE = (2, 6, 10)
TOKENS = 5


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """(config, torch model, our params) on the same random weights. Biases and norm params
    are perturbed so a wrongly mapped bias or scale cannot hide behind zeros and ones."""
    config = UNetConfig.from_dict(CONFIGS[name])
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config.to_dict()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    template = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return config, model, jax.tree.map(jnp.asarray, state_dict_to_params(state_dict, template))


def inputs(config: UNetConfig, shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, h, w = shape
    sample = rng.standard_normal((b, h, w, config.in_channels), np.float32)
    context = rng.standard_normal((b, TOKENS, config.cross_attention_dim), np.float32)
    return sample, context


def run_compiled(fn, *args):
    """jit(fn)(*args) without LLVM's optimisation passes: these tests compare numbers, not
    speed, and compiling takes most of their time (half as long this way)."""
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


def forward(config: UNetConfig, params, sample, timesteps, context, dtype=jnp.float32):
    model = UNet2DConditionModel(config, dtype=dtype)
    return run_compiled(model.apply, {"params": params}, sample, timesteps, context)


def torch_forward(model, sample, timesteps, context) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.as_tensor(timesteps),
                    torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name, shape, timesteps", [
    ("SD1", SD1_SHAPE, np.array([981.5, 3.25], np.float32)),  # fractional, [B]
    ("SD2", SD2_SHAPE, np.array([999, 0], np.int64)),  # integer, [B]
    ("SD2", SD2_SHAPE, 500),  # integer scalar, broadcast over the batch
])
def test_matches_diffusers(name, shape, timesteps):
    config, model, params = reference(name)
    sample, context = inputs(config, shape)
    ours = forward(config, params, sample, timesteps, context)
    ref = torch_forward(model, sample, timesteps, context)
    assert ours.dtype == jnp.float32 and ours.shape == shape + (config.out_channels,)
    err = relative_error(ours, ref)
    print(f"{name} {shape} t={timesteps}: relative error {err:.2e}, output scale {np.abs(ref).max():.2f}")
    assert err <= 1e-4
    # The reference output depends on the timesteps far beyond the tolerance, so matching it
    # proves the timestep embedding right.
    assert relative_error(torch_forward(model, sample, np.full(shape[:1], 7.0), context), ref) > 1e-2


def test_text_time_micro_conditioning_matches_diffusers():
    """SDXL's U-Net: transformer_layers_per_block per block and the "text_time" embedding of
    the pooled text embedding and the six size/crop numbers."""
    config, model, params = reference("SDXL")
    sample, context = inputs(config, SD2_SHAPE)
    rng = np.random.default_rng(1)
    text_embeds = rng.standard_normal((2, SDXL_POOLED), np.float32)
    time_ids = np.array([[1024, 768, 0, 16, 1024, 1024], [512, 512, 8, 0, 768, 1024]], np.float32)
    t = np.array([999.0, 37.5], np.float32)
    model_fn = UNet2DConditionModel(config).apply
    ours = run_compiled(model_fn, {"params": params}, sample, t, context, text_embeds, time_ids)

    def torch_out(ids):
        with torch.no_grad():
            return model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                         torch.from_numpy(context), added_cond_kwargs={
                             "text_embeds": torch.from_numpy(text_embeds),
                             "time_ids": torch.from_numpy(ids)}).sample.numpy().transpose(0, 2, 3, 1)

    ref = torch_out(time_ids)
    err = relative_error(ours, ref)
    print(f"SDXL-shaped U-Net: relative error {err:.2e}")
    assert err <= 1e-4
    assert relative_error(torch_out(time_ids[::-1].copy()), ref) > 1e-2  # the numbers matter
    with pytest.raises(ValueError, match="needs text_embeds"):
        jax.eval_shape(functools.partial(model_fn, {"params": params}), sample, t, context)


# The released SDXL unet/config.json architectures (base 1.0 and refiner 1.0).
SDXL_BASE_UNET = dict(
    sample_size=128, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SDXL_REFINER_UNET = dict(
    sample_size=128, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2
    + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2
    + ("UpBlock2D",), block_out_channels=(384, 768, 1536, 1536),
    attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280, use_linear_projection=True,
    transformer_layers_per_block=4, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560)


@pytest.mark.parametrize("unet, expected", [(SDXL_BASE_UNET, 2_567_463_684),
                                            (SDXL_REFINER_UNET, 2_259_526_660)])
def test_sdxl_parameter_counts(unet, expected):
    shapes = jax.eval_shape(functools.partial(init_params, UNetConfig.from_dict(unet)),
                            jax.random.key(0))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == expected


@pytest.mark.parametrize("config_module, expected", [(sd15, 859_520_964), (sd21, 865_910_724)])
def test_parameter_count(config_module, expected):
    config = UNetConfig.from_dict(config_module.get_config().unet)
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == expected


def test_bfloat16_close_to_float32():
    config, model, params = reference("SD2")
    sample, context = inputs(config, SD2_SHAPE)
    t = np.array([981.5, 3.25], np.float32)
    half = forward(config, params, sample, t, context, dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32
    err = relative_error(half, torch_forward(model, sample, t, context))
    print(f"bf16 compute vs fp32 reference: relative error {err:.2e}")
    assert 1e-4 < err < 5e-2  # above: the compute really ran in bf16


def test_remat_keeps_outputs_and_gradients():
    config, _, params = reference("ONE_LEVEL")
    sample, context = inputs(config, (2, 4, 6))
    t = np.array([10.0, 500.0], np.float32)

    def loss_and_grad(policy):
        model = UNet2DConditionModel(config, remat_policy=policy)
        loss = lambda p: jnp.mean(model.apply({"params": p}, sample, t, context) ** 2)
        # Rematerialised blocks lower behind optimisation barriers: the policy took effect.
        hlo = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
        assert ("optimization_barrier" in hlo) == (policy is not None)
        return run_compiled(jax.value_and_grad(loss), params)

    (loss, grads), (remat_loss, remat_grads) = loss_and_grad(None), loss_and_grad("nothing_saveable")
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    worst = max(relative_error(a, b) for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)))
    print(f"remat nothing_saveable: loss {loss:.6f}, worst gradient relative error {worst:.2e}")
    assert worst <= 1e-6
    assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)


def test_unknown_remat_policy():
    config = UNetConfig.from_dict(SD2_TINY)
    sample, context = inputs(config, SD2_SHAPE)
    model = UNet2DConditionModel(config, remat_policy="save_everything")
    with pytest.raises(ValueError, match="save_everything.*nothing_saveable"):
        jax.eval_shape(model.init, jax.random.key(0), sample, 0, context)
    assert "dots_with_no_batch_dims_saveable" in REMAT_POLICIES


@pytest.mark.parametrize("height, width", [(12, 6), (10, 8)])
def test_bad_spatial_size(height, width):
    config = UNetConfig.from_dict(SD1_TINY)
    sample = np.zeros((1, height, width, config.in_channels), np.float32)
    context = np.zeros((1, TOKENS, config.cross_attention_dim), np.float32)
    with pytest.raises(ValueError, match=f"{height}x{width} is not a multiple of 4"):
        jax.eval_shape(UNet2DConditionModel(config).init, jax.random.key(0), sample, 0, context)


@pytest.mark.parametrize("key, value, message", [
    ("transformer_layers_per_block", (1, 2, 3), "3 transformer_layers_per_block entries for 2"),
    ("class_embed_type", "timestep", "class_embed_type='timestep' .*supported: \\[None\\]"),
    ("addition_embed_type", "text", "addition_embed_type='text' .*'text_time'"),
    ("addition_embed_type", "text_time", "needs addition_time_embed_dim"),
    ("only_cross_attention", True, "only_cross_attention=True"),
    ("dual_cross_attention", True, "dual_cross_attention=True"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn",
     "mid_block_type='UNetMidBlock2DSimpleCrossAttn' .*UNetMidBlock2DCrossAttn"),
    ("act_fn", "gelu", "act_fn='gelu' .*silu"),
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D"),
     "down_block_types: .*AttnDownBlock2D.*supported: .*CrossAttnDownBlock2D"),
    ("up_block_types", ("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
     "up_block_types: .*SimpleCrossAttnUpBlock2D.*supported: .*CrossAttnUpBlock2D"),
    ("frobnicate", 1, "'frobnicate' is not supported"),
])
def test_unsupported_config(key, value, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**SD2_TINY, key: value})


# Released diffusers unet/config.json files (SD 1.5, SD 2.1 768-v, SD 1.5 inpainting).
SD15_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 768, "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 64,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": None, "use_linear_projection": False,
}
SD21_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}
SD15_INPAINTING_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0.dev0",
    "_name_or_path": "./stable-diffusion-v1-5-inpainting/unet", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 9,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 32,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}


def test_accepts_released_configs():
    sd15_config = UNetConfig.from_dict(SD15_JSON)
    assert sd15_config == dataclasses.replace(UNetConfig.from_dict(sd15.get_config().unet),
                                              attention_head_dim=8)
    assert sd15_config.upcast_attention is False and sd15_config.heads_per_block == (8,) * 4
    sd21_config = UNetConfig.from_dict(SD21_JSON)
    assert sd21_config == UNetConfig.from_dict(sd21.get_config().unet)
    assert UNetConfig.from_dict(SD15_INPAINTING_JSON).in_channels == 9
    tiny_config = UNetConfig.from_dict(tiny.get_config().unet)
    assert UNetConfig.from_dict(tiny_config.to_dict()) == tiny_config
    # diffusers' newer name for the head count wins over the legacy one.
    assert UNetConfig.from_dict({**SD2_TINY, "num_attention_heads": (4, 8)}).heads_per_block == (4, 8)


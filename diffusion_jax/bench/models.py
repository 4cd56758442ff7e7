"""Model benchmarks: the U-Net forward, one U-Net training step (its text context
precomputed, or encoded by the frozen text towers in the step), VAE encode + decode.

Each draws random weights for a config (`weights.random_params`), compiles the function
once, times the compiled executable and, with `compare_torch`, runs the same work through
diffusers' PyTorch model holding the same weights (`convert.torch_params`).
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import system
from diffusion_jax.adapters import lora_export, lora_train
from diffusion_jax.bench import measure
from diffusion_jax.bench.weights import random_params
from diffusion_jax.convert.torch_params import params_to_state_dict
from diffusion_jax.models import KINDS
from diffusion_jax.models import unet as unet_lib
from diffusion_jax.models import vae as vae_lib
from diffusion_jax.models.layers import REMAT_POLICIES
from diffusion_jax.training.state import TrainState, make_train_step

TEXT_TOKENS = 77  # CLIP context length, as the pipeline and training feed the U-Net
CONTEXTS = ("precomputed", "encoded")  # bench train: the batch's context, or the ids encoded
# AdamW as both sides run it (optax's and torch's defaults differ in weight decay only).
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2


def _unet_inputs(config: unet_lib.UNetConfig, batch: int) -> dict[str, np.ndarray]:
    if not config.sample_size:
        raise ValueError("the config's unet section has no sample_size (the latent side)")
    rng = np.random.default_rng(0)
    side = config.sample_size
    inputs = dict(
        sample=rng.standard_normal((batch, side, side, config.in_channels), np.float32),
        timesteps=rng.integers(0, 1000, batch).astype(np.float32),
        context=rng.standard_normal((batch, TEXT_TOKENS, config.cross_attention_dim),
                                    np.float32))
    if config.addition_embed_type == "text_time":  # SDXL base's six size/crop numbers
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["text_embeds"] = rng.standard_normal((batch, pooled), np.float32)
        inputs["time_ids"] = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (batch, 1))
    return inputs


def _result(name: str, *, batch: int, dtype: str, repeats: int, compiled: measure.Compiled,
            median_s: float, **details) -> dict:
    """The figures every model benchmark reports, read right after our timed runs (before
    any PyTorch model exists, so the peak RSS is ours)."""
    return dict(benchmark=name, batch=batch, dtype=dtype, repeats=repeats, **details,
                **measure.throughput(batch, median_s, measure.xla_flops(compiled.executable)),
                compile_s=compiled.seconds, **compiled.options_shown,
                **measure.xla_memory(compiled.executable), **measure.peak_memory(),
                **measure.environment())


def bench_unet(config: Mapping[str, Any], *, batch: int = 8, dtype: str = "float32",
               repeats: int = 5, compare_torch: bool = False) -> dict:
    """The U-Net forward on [batch, side, side, C] latents, timesteps and a 77-token context."""
    cfg = unet_lib.UNetConfig.from_dict(config["unet"])
    model = unet_lib.UNet2DConditionModel(cfg, dtype=measure.DTYPES[dtype])
    params = random_params("unet", config["unet"], seed=0)
    inputs = _unet_inputs(cfg, batch)
    forward = lambda p, x, t, c, *added: model.apply({"params": p}, x, t, c, *added)
    added = [inputs[k] for k in ("text_embeds", "time_ids") if k in inputs]
    args = jax.device_put((params, inputs["sample"], inputs["timesteps"], inputs["context"],
                           *added))
    compiled = measure.compile_timed(forward, *args, program_kind="forward")
    ours, median_s = measure.warm_median(lambda: compiled.executable(*args), repeats)
    result = _result("unet", batch=batch, dtype=dtype, repeats=repeats, compiled=compiled,
                     median_s=median_s,
                     latent_shape=list(inputs["sample"].shape))
    if compare_torch:
        import torch

        module = _torch_model("UNet2DConditionModel", cfg, params)
        sample, timesteps, context = (torch.from_numpy(_nchw(inputs["sample"])),
                                      torch.from_numpy(inputs["timesteps"]),
                                      torch.from_numpy(inputs["context"]))

        added_cond = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")
                      if k in inputs}

        def run():
            with _autocast(dtype):
                return module(sample, timesteps, context,
                              added_cond_kwargs=added_cond or None).sample

        reference, torch_s = _torch_warm_median(run, repeats, grad=False)
        result.update(_torch_figures(batch, median_s, torch_s))
        result.update(measure.output_difference(ours, _nhwc(reference)))
    return result


def _epsilon_loss(model: unet_lib.UNet2DConditionModel, text: system.Models | None = None):
    """MSE of the predicted noise against the noise given in the batch: the work of a
    diffusion training step without the sampling of noise and timesteps around it. With
    `text`, the context is encoded from the batch's ids by the frozen text towers in the step
    (as training does without precomputed embeddings); else it is the batch's."""

    def loss_fn(params, frozen, batch, rng):
        del rng
        if text is None:
            cond = {"context": batch["context"]}
            if "text_embeds" in batch:  # a text_time U-Net's pooled embedding
                cond["pooled"] = batch["text_embeds"]
        else:
            ids = {key: batch[key] for key in text.system.ids_keys}
            cond = system.encode_text(text, frozen, ids)
        if "time_ids" in batch:
            cond["time_ids"] = batch["time_ids"]
        prediction = unet_lib.denoise(model, params, batch["noisy_latents"], batch["timesteps"],
                                      cond)
        return jnp.mean(jnp.square(prediction - batch["noise"])), {}

    return loss_fn


def _text_towers(config: Mapping[str, Any], dtype: str, batch: int):
    """(the system's modules, its text towers' random params, random ids by ids key) for
    `context="encoded"`."""
    described = system.from_config(config)
    missing = [n for n in (*described.text_names, described.vae.name) if n not in config]
    if missing:
        raise ValueError(f"bench train --context encoded needs the config sections {missing}")
    models = system.build(described, config, dtype=measure.DTYPES[dtype])
    rng = np.random.default_rng(2)
    params, ids = {}, {}
    for i, tower in enumerate(described.text_towers):
        section = dict(config[tower.name])
        params[tower.name] = random_params(tower.kind, section, seed=2 + i)
        ids[tower.ids_key] = rng.integers(0, section["vocab_size"], (batch, TEXT_TOKENS)
                                          ).astype(np.int32)
    return models, params, ids


def adamw_steps_timed(loss_fn, trained, shapes, frozen, batch_arrays, repeats: int):
    """(compiled step, median seconds, [first, last] loss, state shapes) of the project's
    `make_train_step` with optax's AdamW (no EMA), jitted with the state donated.
    `trained()` draws the trained params (the state takes them over); `shapes` are theirs,
    so the step compiles from shapes before the state exists: the compiler's memory is free
    again when the state and the step's buffers need it (SD 1.5 is tight in 24 GiB)."""
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    train_step = make_train_step(loss_fn, optimizer, lambda _: LEARNING_RATE, ema_max_decay=None)
    create_state = lambda params: TrainState.create(
        params, optimizer, jax.random.key_data(jax.random.key(0)), use_ema=False)
    state_shapes = jax.eval_shape(create_state, shapes)
    compiled = measure.compile_timed(train_step, state_shapes, frozen, batch_arrays,
                                     program_kind="train_step", donate_argnums=(0,))
    current, losses = [create_state(trained())], []

    def step():
        current[0], metrics = compiled.executable(current[0], frozen, batch_arrays)
        losses.append(metrics["loss"])
        return current[0]

    _, median_s = measure.warm_median(step, repeats)
    # Losses before the first update and after the last: equal on both sides when the
    # gradients and AdamW are (the steps repeat one batch).
    return compiled, median_s, [float(losses[0]), float(losses[-1])], state_shapes


def _lora_section(rank: int) -> dict:
    """bench train --lora RANK: PEFT's usual recipe, the U-Net's attention projections with
    alpha = rank (scale 1)."""
    return dict(rank=rank, alpha=float(rank), targets=(lora_train.ATTENTION,))


def _lora_setup(config: Mapping[str, Any], rank: int, base_loss, frozen: dict):
    """(the loss over {"lora": factors}, frozen params with the base U-Net, the factors):
    the trainer's LoRA step, whose factors are all the optimizer holds. The factors start
    from lora_train.init with `up` drawn too (not zero), so the step's gradients reach
    every factor."""
    ckpt_config = {**config, lora_train.ITEM: _lora_section(rank)}
    factors = lora_train.init(ckpt_config, jax.random.key(3))
    factors = jax.tree.map(lambda f: np.asarray(
        f + 0.01 * jax.random.normal(jax.random.key(4), f.shape)), factors)
    tower_loss = lambda towers, rest, batch, rng: base_loss(towers["unet"], rest, batch, rng)
    frozen = {**frozen, "unet": random_params("unet", config["unet"], seed=0)}
    return lora_train.loss_fn(tower_loss, ckpt_config), frozen, {lora_train.ITEM: factors}


def bench_train(config: Mapping[str, Any], *, batch: int = 8, dtype: str = "float32",
                remat: str | None = None, repeats: int = 5, compare_torch: bool = False,
                context: str = "precomputed", lora: int | None = None) -> dict:
    """One U-Net training step: forward, epsilon MSE, gradients, AdamW update; the project's
    `make_train_step` (no EMA), jitted with the state donated. `context`: "precomputed" (the
    batch holds the text context, as precomputed embeddings give it) or "encoded" (the batch
    holds token ids, and the frozen text towers encode them in every step). `lora`: a rank;
    the step trains LoRA factors of the U-Net's attention alone, its base frozen (the
    reference: diffusers with PEFT's LoRA layers)."""
    from diffusion_jax.bench import flow_transformers

    if flow_transformers.is_flow_transformer(config):
        given = [f"--{name}" for name, value in (("remat", remat), ("lora", lora)) if value]
        if given or context != "precomputed":
            raise ValueError(f"{', '.join(given) or '--context'}: bench train of a flow "
                             "transformer times its plain step; leave it out")
        return flow_transformers.bench_train(config, batch=batch, dtype=dtype, repeats=repeats,
                                             compare_torch=compare_torch)
    if lora is not None and lora < 1:
        raise ValueError(f"--lora {lora}: the LoRA rank must be at least 1, e.g. 4")
    if remat is not None and remat not in REMAT_POLICIES:
        raise ValueError(f"--remat {remat!r}: valid policies are {list(REMAT_POLICIES)}")
    if context not in CONTEXTS:
        raise ValueError(f"--context {context!r}: use one of {list(CONTEXTS)}")
    if compare_torch and context != "precomputed":
        raise ValueError("--compare torch times the U-Net step on a precomputed context: "
                         "leave out --context encoded")
    cfg = unet_lib.UNetConfig.from_dict(config["unet"])
    model = unet_lib.UNet2DConditionModel(cfg, dtype=measure.DTYPES[dtype], remat_policy=remat)
    inputs = _unet_inputs(cfg, batch)
    noise = np.random.default_rng(1).standard_normal(inputs["sample"].shape).astype(np.float32)
    arrays = dict(noisy_latents=inputs["sample"], noise=noise, timesteps=inputs["timesteps"])
    if "time_ids" in inputs:
        arrays["time_ids"] = inputs["time_ids"]
    text, frozen = None, {}
    if context == "encoded":
        text, frozen, ids = _text_towers(config, dtype, batch)
        arrays.update(ids)
    else:
        arrays["context"] = inputs["context"]
        if "text_embeds" in inputs:
            arrays["text_embeds"] = inputs["text_embeds"]
    batch_arrays = jax.device_put(arrays)
    loss_fn = _epsilon_loss(model, text)
    trained, shapes = (lambda: random_params("unet", config["unet"], seed=0),
                       KINDS["unet"].param_shapes(cfg))
    if lora is not None:
        loss_fn, frozen, factors = _lora_setup(config, lora, loss_fn, frozen)
        trained = lambda: jax.tree.map(jnp.asarray, factors)  # fresh: the state is donated
        shapes = jax.eval_shape(trained)
    compiled, median_s, losses, state_shapes = adamw_steps_timed(loss_fn, trained, shapes,
                                                                 frozen, batch_arrays, repeats)
    result = _result("train", batch=batch, dtype=dtype, repeats=repeats, compiled=compiled,
                     median_s=median_s,
                     remat=remat, context=context, lora_rank=lora,
                     trained_params=sum(x.size for x in jax.tree.leaves(state_shapes.params)),
                     latent_shape=list(inputs["sample"].shape), first_loss=losses[0],
                     last_loss=losses[1])
    if compare_torch:  # our params were donated: the reference draws the same ones again
        params = random_params("unet", config["unet"], seed=0)
        adapter = None if lora is None else (_lora_section(lora), factors[lora_train.ITEM])
        result.update(_torch_train(cfg, params, batch_arrays, dtype, remat, repeats, batch,
                                   median_s, losses, config, adapter))
    return result


def _add_peft_lora(module, config: Mapping[str, Any], section: dict, factors: dict):
    """PEFT's LoRA layers on the diffusers U-Net, holding our factors; the base frozen."""
    import peft
    import torch

    ckpt_config = {**config, lora_train.ITEM: section}
    tensors, _ = lora_export.state_dict(factors, ckpt_config, "peft")
    names = sorted({key[len("unet."):-len(".lora_A.weight")] for key in tensors
                    if key.endswith(".lora_A.weight")})
    module.requires_grad_(False)
    module.add_adapter(peft.LoraConfig(r=section["rank"], lora_alpha=section["alpha"],
                                       target_modules=names))
    with torch.no_grad():
        for name in names:
            layer = module.get_submodule(name)
            for factor in ("lora_A", "lora_B"):
                getattr(layer, factor)["default"].weight.copy_(
                    torch.from_numpy(tensors[f"unet.{name}.{factor}.weight"]))
    return [p for p in module.parameters() if p.requires_grad]


def _torch_train(cfg, params, batch_arrays, dtype, remat, repeats, batch, median_s,
                 losses: list[float], config: Mapping[str, Any],
                 lora: tuple[dict, dict] | None = None) -> dict:
    """diffusers' U-Net and torch.optim.AdamW: forward, MSE, backward, step, zero_grad;
    with `lora` (section, our factors), over PEFT's LoRA layers alone."""
    import torch

    module = _torch_model("UNet2DConditionModel", cfg, params).train()
    if remat is not None:
        module.enable_gradient_checkpointing()
    trained = module.parameters() if lora is None else _add_peft_lora(module, config, *lora)
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    sample, noise = (torch.from_numpy(_nchw(np.asarray(batch_arrays[k])))
                     for k in ("noisy_latents", "noise"))
    timesteps, context = (torch.tensor(np.asarray(batch_arrays[k]))
                          for k in ("timesteps", "context"))
    added_cond = {k: torch.tensor(np.asarray(batch_arrays[k])) for k in ("text_embeds", "time_ids")
                  if k in batch_arrays}

    def forward():
        # Autocast the forward only, as AMP does: with optimizer.step() under CPU autocast
        # too, the bfloat16 updates were lost (the loss barely moved).
        with _autocast(dtype):
            return module(sample, timesteps, context, added_cond_kwargs=added_cond or None
                          ).sample.float()

    return torch_adamw_steps(forward, noise, optimizer, repeats, batch, median_s, losses)


def torch_adamw_steps(forward, target, optimizer, repeats: int, batch: int, median_s: float,
                      losses: list[float]) -> dict:
    """The reference's training step timed: `forward()` -> prediction, MSE against
    `target`, backward, optimizer step, zero_grad; its figures beside ours, with the first
    and last losses of both sides (`losses`: ours)."""
    import torch

    torch_losses = []

    def step():
        loss = torch.nn.functional.mse_loss(forward(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch_losses.append(loss.item())

    _, torch_s = _torch_warm_median(step, repeats, grad=True)
    torch_losses = [torch_losses[0], torch_losses[-1]]
    return dict(**_torch_figures(batch, median_s, torch_s), torch_first_loss=torch_losses[0],
                torch_last_loss=torch_losses[1],
                loss_difference=max(abs(a - b) for a, b in zip(losses, torch_losses)))


def bench_vae(config: Mapping[str, Any], *, batch: int = 4, dtype: str = "float32",
              repeats: int = 5, compare_torch: bool = False) -> dict:
    """VAE encode (the posterior mean) then decode, on images at the config's sample_size."""
    cfg = vae_lib.AutoencoderKLConfig.from_dict(config["vae"])
    model = vae_lib.AutoencoderKL(cfg, dtype=measure.DTYPES[dtype])
    params = random_params("vae", config["vae"], seed=1)
    side = cfg.sample_size
    images = np.random.default_rng(0).uniform(
        -1, 1, (batch, side, side, cfg.in_channels)).astype(np.float32)

    def encode_decode(p, x):
        mean = model.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode).mean
        return model.apply({"params": p}, mean, method=vae_lib.AutoencoderKL.decode)

    args = jax.device_put((params, images))
    compiled = measure.compile_timed(encode_decode, *args, program_kind="vae")
    ours, median_s = measure.warm_median(lambda: compiled.executable(*args), repeats)
    result = _result("vae", batch=batch, dtype=dtype, repeats=repeats, compiled=compiled,
                     median_s=median_s,
                     image_shape=list(images.shape))
    if compare_torch:
        import torch

        module = _torch_model("AutoencoderKL", cfg, params)
        x = torch.from_numpy(_nchw(images))

        def run():
            with _autocast(dtype):
                return module.decode(module.encode(x).latent_dist.mean).sample

        reference, torch_s = _torch_warm_median(run, repeats, grad=False)
        result.update(_torch_figures(batch, median_s, torch_s))
        result.update(measure.output_difference(ours, _nhwc(reference)))
    return result


# ----------------------------------------------------------------------------- PyTorch side


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _nhwc(x) -> np.ndarray:
    return x.detach().float().numpy().transpose(0, 2, 3, 1)


def _torch_model(class_name: str, config, params, buffers: tuple[str, ...] = ()):
    """The diffusers model of our config, holding our params; `buffers`: regexes of the
    state-dict keys it computes itself, which we hold no param for (SD3's pos_embed)."""
    import re

    import diffusers
    import torch

    module = getattr(diffusers, class_name)(**config.to_dict())
    state_dict = {k: torch.tensor(v) for k, v in params_to_state_dict(params).items()}
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not any(re.fullmatch(b, k) for b in buffers)]
    if missing or unexpected:
        raise RuntimeError(f"{class_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module.eval()


def _autocast(dtype: str):
    """Our bfloat16 is a compute dtype over float32 params, as torch's autocast is."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _torch_warm_median(fn, repeats: int, *, grad: bool):
    """(the warm-up call's result, median seconds after it)."""
    import torch

    with contextlib.nullcontext() if grad else torch.inference_mode():
        first = fn()
        return first, statistics.median(measure.timed(fn, repeats))


def _torch_figures(batch: int, median_s: float, torch_s: float) -> dict:
    import torch

    return dict(torch_median_s=torch_s, torch_images_per_s=batch / torch_s,
                torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                ratio_vs_torch=torch_s / median_s)

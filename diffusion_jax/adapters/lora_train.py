"""LoRA training: low-rank factors of chosen Linear layers as the only trained params.

A run with a `lora` config section keeps, beside the frozen towers, one more item of the
params tree, `lora`: per target layer a `down` [r, in] and an `up` [out, r] factor (PyTorch
layouts, as PEFT and kohya files hold them), in a tree mirroring the towers' paths:

    {"lora": {"unet": {"down_blocks_0": {... "attn1": {"to_q": {"down": .., "up": ..}}}}}}

The loss sees each target's weight as W + alpha / r * up @ down (in float32), so the
trainer's `trainable` rule r"lora/.*" puts only the factors in the optimizer and the base
params stay bitwise as they were. `up` starts at zero (step 0 is the base model), `down`
uniform in +-1/sqrt(in), PEFT's default (kaiming_uniform with a=sqrt(5)).

Targets are chosen by regexes fully matching module paths "tower/sub/.../layer" (the param
path without its `/kernel`), of Linear layers only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from diffusion_jax import system as system_lib
from diffusion_jax.training import partition

ITEM = "lora"  # its item in the params tree and the checkpoint, and its config section
# The attention projections of the denoiser's transformer blocks (self and cross).
ATTENTION = r"unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)"
FEED_FORWARD = r"unet/.*/ff/(net_0/proj|net_2)"
TEXT_ATTENTION = r"text_encoder(_2)?/.*/self_attn/(q_proj|k_proj|v_proj|out_proj)"
# Flux's and SD3's transformers: the image stream's attention projections (SD3.5's second
# attention too), as diffusers' train_dreambooth_lora_flux / _sd3 target by default.
TRANSFORMER_ATTENTION = r"transformer/.*/attn2?/(to_q|to_k|to_v|to_out_0)"


def default_config() -> ml_collections.ConfigDict:
    """The `lora` section of a LoRA training config."""
    return ml_collections.ConfigDict(dict(
        rank=4,  # r: the factors' inner width
        alpha=4.0,  # the update is alpha / r * up @ down (PEFT's lora_alpha; kohya's .alpha)
        # Regexes fully matching module paths "tower/.../layer" of Linear layers: attention
        # by default; lora_train.FEED_FORWARD, lora_train.TEXT_ATTENTION add those.
        targets=(ATTENTION,),
    ))


def section(config: Mapping[str, Any]) -> dict | None:
    """The `lora` section of a training or checkpoint config, as a dict; None without one."""
    if ITEM not in config or config[ITEM] is None:
        return None
    value = config[ITEM]
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def adapter_items(ckpt_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The params items beside the system's towers: `lora` in a LoRA run."""
    return (ITEM,) if section(ckpt_config) is not None else ()


def scale(lora_section: Mapping[str, Any]) -> float:
    return float(lora_section["alpha"]) / int(lora_section["rank"])


def check(lora_section: Mapping[str, Any]) -> None:
    """One-line errors for a bad `lora` section, before anything compiles."""
    rank, alpha, targets = (lora_section.get(k) for k in ("rank", "alpha", "targets"))
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--config.lora.rank={rank!r}: must be an integer >= 1, e.g. 4")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"--config.lora.alpha={alpha!r}: must be a number > 0 (alpha = rank "
                         "gives scale 1)")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"--config.lora.targets={targets!r}: must be a tuple of regexes over "
                         f"module paths, e.g. (r'{ATTENTION}',)")


def differences(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """'lora.rank was 4, now 8' for each field in which two configs' LoRA sections differ
    (a workdir resumed with other factors' shapes)."""
    a, b = section(saved), section(ours)
    if (a is None) != (b is None):
        return [f"lora was {a!r}, now {b!r}"]
    as_json = lambda value: list(value) if isinstance(value, (list, tuple)) else value
    return [f"lora.{f} was {a[f]!r}, now {b[f]!r}" for f in ("rank", "alpha", "targets")
            if a is not None and as_json(a[f]) != as_json(b[f])]


def targets(ckpt_config: Mapping[str, Any], rules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{module path "tower/.../layer": (in, out) features} of the Linear layers `rules`
    match; every rule must match one, and none may match a conv."""
    system = system_lib.from_config(ckpt_config)
    shapes = system_lib.param_shapes(system, ckpt_config)
    kernels = {path[:-len("/kernel")]: leaf.shape
               for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items()
               if path.endswith("/kernel")}
    matches = partition.matcher(rules)
    chosen = {module: shape for module, shape in kernels.items() if matches(module)}
    for rule in partition.unmatched(rules, chosen):
        raise ValueError(f"--config.lora.targets: r'{rule}' matches no layer; module paths "
                         f"look like {next(iter(kernels))} (towers {', '.join(system.names)})")
    convs = [module for module, shape in chosen.items() if len(shape) != 2]
    if convs:
        raise ValueError(f"--config.lora.targets match {len(convs)} conv layers ({convs[0]}); "
                         "only Linear layers are trained as LoRA here: narrow the regexes")
    return {module: tuple(shape) for module, shape in chosen.items()}


def _down_init(rng: jax.Array, rank: int, features_in: int) -> jax.Array:
    bound = 1.0 / features_in ** 0.5  # kaiming_uniform(a=sqrt(5)) of a [rank, in] weight
    return jax.random.uniform(rng, (rank, features_in), jnp.float32, -bound, bound)


def init(ckpt_config: Mapping[str, Any], rng: jax.Array) -> dict:
    """Fresh factors of the checkpoint config's `lora` section: {tower: {...: {down, up}}}."""
    lora = section(ckpt_config)
    rank = int(lora["rank"])
    flat = {}
    for i, (module, (features_in, features_out)) in enumerate(
            sorted(targets(ckpt_config, lora["targets"]).items())):
        flat[f"{module}/down"] = _down_init(jax.random.fold_in(rng, i), rank, features_in)
        flat[f"{module}/up"] = jnp.zeros((features_out, rank), jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def shapes(ckpt_config: Mapping[str, Any]) -> dict:
    """The factors as jax.ShapeDtypeStructs (checkpoint templates, dry runs)."""
    return jax.eval_shape(lambda: init(ckpt_config, jax.random.key(0)))


def modules(lora: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{module path "tower/.../layer": {"down": [r, in], "up": [out, r]}} of a factor tree."""
    found: dict[str, dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(lora, sep="/").items():
        module, factor = path.rsplit("/", 1)
        found.setdefault(module, {})[factor] = leaf
    return found


def merge(towers: Mapping[str, Any], lora: Mapping[str, Any], lora_scale: float) -> dict:
    """`towers` with each target's kernel W (Flax [in, out]) replaced by
    W + scale * (up @ down)^T, in float32; traceable (the loss merges under jit)."""
    flat = traverse_util.flatten_dict({n: towers[n] for n in lora}, sep="/")
    for module, factors in modules(lora).items():
        delta = jnp.matmul(factors["down"].T, factors["up"].T,
                           precision=jax.lax.Precision.HIGHEST)  # [in, out]
        kernel = f"{module}/kernel"
        flat[kernel] = flat[kernel].astype(jnp.float32) + lora_scale * delta
    return {**towers, **traverse_util.unflatten_dict(flat, sep="/")}


def adapted(params: Mapping[str, Any], ckpt_config: Mapping[str, Any]) -> dict:
    """{tower: params} of a params tree that may hold a `lora` item, the factors merged in
    (what sampling and evaluation use); a tree without one as it is."""
    if ITEM not in params:
        return dict(params)
    towers = {n: t for n, t in params.items() if n != ITEM}
    return merge(towers, params[ITEM], scale(section(ckpt_config)))


def loss_fn(inner, ckpt_config: Mapping[str, Any]):
    """A loss of (trained, frozen, batch, rng) over the towers made one over a tree with a
    `lora` item: the factors merged into their towers, which the inner loss sees as trained
    (a text tower with LoRA factors encodes the batch's ids itself)."""
    lora_scale = scale(section(ckpt_config))

    def wrapped(params, frozen, batch, rng):
        tree = partition.combine(frozen, params)
        lora = tree.pop(ITEM)
        towers = merge(tree, lora, lora_scale)
        changed = {n: towers[n] for n in lora}
        rest = {n: t for n, t in towers.items() if n not in lora}
        return inner(changed, rest, batch, rng)

    return wrapped

"""A small Fashion-MNIST classifier: does a generated sample show the class its prompt named?

A CPU-scale stand-in for CLIP score. The classifier is trained on the real training split (a
minute on two CPU cores); `conditional_accuracy(params, samples, prompted_labels)` then says
how often a sample generated for "a photo of a sneaker" is classified as a sneaker, overall,
per class, and as a confusion matrix.

Generated images arrive at the demo's resolution (32x32 RGB uint8); `prepare` brings any
[N, H, W, 3] / [N, H, W, 1] / [N, H, W] batch back to the classifier's 28x28 grayscale input.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from diffusion_jax.data import fashion_mnist

IMAGE_SIZE = 28
NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)
DEFAULT_STEPS = 1500
# ITU-R BT.601 luma, as PIL's convert("L"): equal to the mean for gray repeated to 3 channels.
LUMA = (0.299, 0.587, 0.114)
CACHE_FORMAT = "fashion-classifier-v1"
PREDICT_CHUNK = 1000

log = logging.getLogger(__name__)


class FashionClassifier(nn.Module):
    """Two strided conv-relu stages and an MLP head: [N, 28, 28, 1] in [-1, 1] -> logits [N, 10].

    Strided convolutions rather than conv + max-pool: on XLA's CPU backend a full-resolution
    convolution and its gradient cost several times more per step, for about the same accuracy.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, features in enumerate((32, 64)):
            x = nn.Conv(features, (3, 3), strides=(2, 2), padding="SAME", name=f"conv_{i}")(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="dense_0")(x))
        return nn.Dense(NUM_CLASSES, name="dense_1")(x)


def prepare(images, *, value_range: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """Any batch of images -> the classifier's input, float32 [N, 28, 28, 1] in [-1, 1].

    `images` is [N, H, W], [N, H, W, 1] or [N, H, W, 3]: uint8 in [0, 255], or float in
    `value_range` ((0, 1) by default, as `diffusion-jax sample` writes .npy files; pass (-1, 1)
    for decoder outputs). RGB becomes gray by BT.601 luma (PIL's convert("L")); other sizes are
    resized to 28x28 by an antialiased linear filter, so a 32x32 upscale of a 28x28 image comes
    back close to the original.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W], [N, H, W, 1] or [N, H, W, 3]; got shape "
                         f"{images.shape}")
    if min(images.shape[1:3]) < 1:
        raise ValueError(f"images must have a positive height and width; got shape {images.shape}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        low, high = value_range
        x = (images.astype(np.float32) - low) / (high - low)
    else:
        raise ValueError(f"images must be uint8 or floating point; got dtype {images.dtype}")
    x = jnp.asarray(x)
    if x.shape[-1] == 3:
        x = jnp.tensordot(x, jnp.asarray(LUMA, jnp.float32), axes=1)[..., None]
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), "linear", antialias=True)
    return jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0


def _init_params(seed: int) -> dict:
    dummy = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)
    return FashionClassifier().init(jax.random.key(seed), dummy)["params"]


def _augment(rng: jax.Array, x: jax.Array) -> jax.Array:
    # Random horizontal flips: the diffusion data pipeline flips its training images, so
    # generated shoes may face either way while the dataset's mostly face one way.
    flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)


def _make_train_step(optimizer: optax.GradientTransformation):
    model = FashionClassifier()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, rng, images, labels):
        x = _augment(rng, images[..., None].astype(jnp.float32) / 127.5 - 1.0)

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def train_classifier(seed: int = 0, steps: int = DEFAULT_STEPS, batch_size: int = 128) -> dict:
    """Params of a FashionClassifier trained on Fashion-MNIST's training split.

    Adam with a warm-up + cosine learning rate; batches drawn by epoch-wise shuffling.
    The default (1500 steps of 128, about 3 epochs) reaches ~90% on the test split.
    """
    images, labels = fashion_mnist.load("train")
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, 2e-3, warmup_steps=min(100, steps // 10), decay_steps=steps, end_value=1e-5))
    params = _init_params(seed)
    opt_state = optimizer.init(params)
    train_step = _make_train_step(optimizer)
    order_rng = np.random.default_rng(seed)
    key = jax.random.key(seed + 1)
    order = np.empty(0, np.int64)
    start = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, order_rng.permutation(len(images))])
        batch, order = order[:batch_size], order[batch_size:]
        params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(key, step),
                                             images[batch], labels[batch].astype(np.int32))
    final_loss = float(loss) if steps else float("nan")  # waits for the last step
    log.info("trained the Fashion-MNIST classifier: %d steps in %.1f s, final loss %.3f",
             steps, time.perf_counter() - start, final_loss)
    return params


def save(params: dict, path: str | os.PathLike, seed: int) -> None:
    """The params as a safetensors file at `path` (local or gs://)."""
    from safetensors.numpy import save as to_bytes

    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes({k: np.asarray(v) for k, v in flat.items()},
                              metadata={"format": CACHE_FORMAT, "seed": str(seed)}))


def _load_cached(path: epath.Path, seed: int) -> dict | None:
    """The cached params, or None (with the reason logged) if they cannot be used."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as from_bytes

    try:  # bytes, not safe_open: the file may be on GCS
        data = path.read_bytes()
        flat = from_bytes(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        metadata = header.get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("classifier cache %s is unreadable (%s); retraining", path, e)
        return None
    if metadata.get("format") != CACHE_FORMAT or metadata.get("seed") != str(seed):
        log.warning("classifier cache %s is for %s seed %s, not %s seed %s; retraining", path,
                    metadata.get("format"), metadata.get("seed"), CACHE_FORMAT, seed)
        return None
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(
        jax.eval_shape(lambda: _init_params(seed)), sep="/").items()}
    if {k: v.shape for k, v in flat.items()} != expected:
        log.warning("classifier cache %s does not match the FashionClassifier parameter shapes; "
                    "retraining", path)
        return None
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def load_or_train(cache_path: str | os.PathLike | None, seed: int = 0) -> dict:
    """Classifier params from `cache_path` (safetensors, local or gs://), training and writing
    them if the file is missing, unreadable, or from another seed or architecture. None: train,
    cache nothing."""
    if cache_path is not None:
        cache_path = epath.Path(cache_path)
        if cache_path.exists():
            params = _load_cached(cache_path, seed)
            if params is not None:
                return params
    params = train_classifier(seed)
    if cache_path is not None:
        save(params, cache_path, seed)
    return params


@jax.jit
def _predict_chunk(params: dict, x: jax.Array) -> jax.Array:
    return jnp.argmax(FashionClassifier().apply({"params": params}, x), axis=-1).astype(jnp.int32)


def predict(params: dict, images, **prepare_kwargs) -> np.ndarray:
    """Predicted class ids, int32 [N]; `images` as `prepare` takes them."""
    x = prepare(images, **prepare_kwargs)
    n = x.shape[0]
    # Chunks bound the memory; padding the last one keeps a large N to one compiled shape.
    chunk = min(PREDICT_CHUNK, max(n, 1))
    padded = jnp.pad(x, ((0, -n % chunk), (0, 0), (0, 0), (0, 0)))
    out = [_predict_chunk(params, padded[i:i + chunk]) for i in range(0, padded.shape[0], chunk)]
    return np.concatenate([np.asarray(o) for o in out] or [np.zeros(0, np.int32)])[:n]


def _check_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels, one per image; got shape {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be class ids in [0, {NUM_CLASSES}); got "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def accuracy(params: dict, images, labels, **prepare_kwargs) -> float:
    """Fraction of `images` classified as `labels`."""
    predicted = predict(params, images, **prepare_kwargs)
    labels = _check_labels(labels, len(predicted))
    return float(np.mean(predicted == labels)) if len(labels) else float("nan")


def conditional_accuracy(params: dict, images, prompted_labels, **prepare_kwargs) -> dict:
    """How often a sample generated for class c is classified as c.

    Returns {"accuracy": float, "count": N,
             "per_class": {class name: accuracy, or None for a class with no samples},
             "confusion": 10x10 nested list of counts, row = prompted class, column = predicted}.
    """
    predicted = predict(params, images, **prepare_kwargs)
    prompted = _check_labels(prompted_labels, len(predicted))
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(confusion, (prompted, predicted), 1)
    per_class_count = confusion.sum(axis=1)
    per_class = {name: (float(confusion[c, c] / per_class_count[c]) if per_class_count[c] else None)
                 for c, name in enumerate(fashion_mnist.CLASS_NAMES)}
    count = len(prompted)
    return {"accuracy": float(np.trace(confusion) / count) if count else float("nan"),
            "count": count,
            "per_class": per_class,
            "confusion": confusion.tolist()}

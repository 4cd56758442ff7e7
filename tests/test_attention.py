"""Chunked attention (the CPU default) against jax.nn.dot_product_attention: values and
gradients, every chunking path (one chunk, groups of rows, query blocks), bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import layers

# (batch, query tokens, key tokens, heads, head dim, chunk elements): chunk sizes chosen so
# that each case takes a different path through chunked_attention.
CASES = {
    "one_chunk": (2, 12, 7, 3, 4, 2 ** 20),
    "row_groups": (2, 12, 7, 3, 4, 12 * 7 * 2),  # 3 groups of 2 (batch, head) rows
    "query_blocks": (2, 12, 7, 3, 4, 4 * 7),  # 1 row per group, 3 blocks of 4 queries
    "odd_sizes": (1, 15, 15, 1, 8, 5 * 15),  # blocks of a divisor of T (5)
}


def inputs(b, t, s, h, d, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d)) * 2.0
    k = jax.random.normal(keys[1], (b, s, h, d)) * 2.0
    v = jax.random.normal(keys[2], (b, s, h, d))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_matches_jax(attention, q, k, v, *, atol, grad_atol):
    """Values and gradients (of sum(sin(out))) against jax.nn.dot_product_attention's."""
    ref = lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")
    np.testing.assert_allclose(attention(q, k, v), ref(q, k, v), atol=atol, rtol=0)
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
    grads = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
    for ours_g, ref_g in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(ours_g, ref_g, atol=grad_atol, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_chunked_attention_matches_jax(case, monkeypatch):
    b, t, s, h, d, chunk = CASES[case]
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_ELEMENTS", chunk)
    assert_matches_jax(layers.chunked_attention, *inputs(b, t, s, h, d), atol=2e-6,
                       grad_atol=1e-5)


def test_chunked_attention_bfloat16(monkeypatch):
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_ELEMENTS", 4 * 7)
    q, k, v = inputs(2, 12, 7, 3, 4, jnp.bfloat16)
    ours = layers.chunked_attention(q, k, v)
    assert ours.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=3e-2, rtol=0)

    # The custom VJP of the scores returns cotangents in the inputs' dtype.
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32))))
    grads = jax.grad(loss(layers.chunked_attention), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for ours_g, ref_g in zip(grads, ref_grads):
        assert ours_g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(ours_g, np.float32), ref_g, atol=0.05, rtol=0.02)


def test_implementation_choice():
    q = jnp.ones((1, 3, 8))
    with pytest.raises(ValueError, match="causal"):
        layers.dot_product_attention(q, q, q, heads=2, is_causal=True, implementation="chunked")
    with pytest.raises(ValueError, match="not one of"):
        layers.dot_product_attention(q, q, q, heads=2, implementation="flash")
    # The projections' layout [B, T, heads * d] is kept whichever implementation runs.
    out = {impl: layers.dot_product_attention(q * jnp.arange(8.0), q, q, heads=2,
                                              implementation=impl)
           for impl in (None, "chunked", "xla")}
    assert out[None].shape == (1, 3, 8)
    np.testing.assert_allclose(out["chunked"], out["xla"], atol=1e-6)


def test_splash_attention_matches_jax_in_interpret_mode():
    # The TPU kernel, run by Pallas' interpreter here: 130 queries and 77 keys are padded to
    # its 128 tile (the padded keys masked out by segment ids), head dim 40 to 128 lanes.
    assert_matches_jax(layers.splash_attention, *inputs(1, 130, 77, 2, 40), atol=1e-5,
                       grad_atol=5e-5)
    q_, k_, v_ = inputs(1, 77, 77, 2, 40)

    # Through the projections' layout [B, T, heads * d], as every tower calls it.
    flat = lambda x: x.reshape(*x.shape[:2], -1)
    chosen = layers.dot_product_attention(flat(q_), flat(k_), flat(v_), heads=2,
                                          implementation="splash")
    np.testing.assert_allclose(chosen, flat(jax.nn.dot_product_attention(q_, k_, v_)),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="splash attention has no causal mask"):
        layers.dot_product_attention(flat(q_), flat(q_), flat(q_), heads=2, is_causal=True,
                                     implementation="splash")

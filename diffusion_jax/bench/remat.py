"""`python -m diffusion_jax.bench.remat`: XLA's temporaries of the gradient of N toy blocks,
unrolled or under `lax.scan`, with and without `jax.checkpoint` (BENCHMARKS.md: XLA CPU's
memory analysis of an unrolled remat'd loop is that of no remat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOKENS, WIDTH = 4096, 1024


def _block(w, x):
    return x + jax.nn.gelu(x @ w[0]) @ w[1]


def temp_bytes(blocks: int, remat: bool, scan: bool) -> int:
    f = jax.checkpoint(_block, policy=jax.checkpoint_policies.nothing_saveable) if remat else _block
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

    def loss(ws, x):
        if scan:
            x, _ = jax.lax.scan(lambda c, w: (f(w, c), None), x, ws)
        else:
            for w in ws:
                x = f(w, x)
        return jnp.sum(x ** 2)

    ws = ((shape(blocks, WIDTH, 4 * WIDTH), shape(blocks, 4 * WIDTH, WIDTH)) if scan else
          [(shape(WIDTH, 4 * WIDTH), shape(4 * WIDTH, WIDTH)) for _ in range(blocks)])
    compiled = jax.jit(jax.grad(loss)).lower(ws, shape(TOKENS, WIDTH)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    print(f"{jax.devices()[0].platform}: temporaries (MiB) of grad over N blocks "
          f"[{TOKENS}, {WIDTH}] -> [{TOKENS}, {4 * WIDTH}] -> [{TOKENS}, {WIDTH}], f32")
    print("blocks  unrolled  unrolled+remat  scan  scan+remat")
    for n in (2, 4, 8):
        row = [temp_bytes(n, remat, scan) // 2 ** 20
               for scan in (False, True) for remat in (False, True)]
        print(f"{n:>6}  {row[0]:>8}  {row[1]:>14}  {row[2]:>4}  {row[3]:>10}")


if __name__ == "__main__":
    main()

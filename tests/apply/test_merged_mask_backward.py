"""An attention whose mask ANDs a causal mask with a padding mask (as keras-hub's GPT-2 does),
trained with jax.grad: the backward jax.grad writes reads the merged mask, and the applied
program still replaces forward and backward by the tiled kernel (keras-free)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import tiermap

N, D, HEADS, WIDTH = 64, 16, 2, 32


def _step(ws: jax.Array, x: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
    def loss(w: jax.Array) -> jax.Array:
        q, k, v = ((x @ w[i]).reshape(2, N, HEADS, D) for i in range(3))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(D).astype(x.dtype)
        causal = jnp.tril(jnp.ones((N, N), bool))
        mask = causal[None, None] & (pad[:, None, None, :] > 0)
        p = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(2, N, HEADS * D)
        return jnp.sum(out ** 2)

    value, grad = jax.value_and_grad(loss)(ws)
    return value, ws - 1e-2 * grad


def test_merged_causal_and_padding_mask_backward_is_replaced() -> None:
    ws = jax.random.normal(jax.random.key(0), (3, WIDTH, WIDTH)) * 0.1
    x = jax.random.normal(jax.random.key(1), (2, N, WIDTH))
    pad = jnp.ones((2, N), jnp.int32).at[1, N - 9:].set(0)  # the second row ends in padding
    fast = tiermap.jit(_step, target="h100", time_limit_s=10)
    got, want = fast(ws, x, pad), jax.jit(_step)(ws, x, pad)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    decisions = [d for d in fast.lower(ws, x, pad).decisions() if d.kind == "attention"]
    assert decisions and all(d.applied for d in decisions), decisions
    assert any("backward (written by jax.grad) replaced" in d.detail for d in decisions)

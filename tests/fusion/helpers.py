"""Attention programs in the forms tiermap must recognise, and small random inputs for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Fn = Callable[..., Any]


def jax_attention(causal: bool = False) -> Fn:
    """`jax.nn.dot_product_attention` (XLA implementation), layout [B, N, H, d]."""

    def fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    return fn


def hand_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`softmax(q @ k.T / sqrt(d)) @ v` on [N, d] arrays."""
    return jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1] * 1.0)) @ v


def hand_bias_causal(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head einsum attention with a position bias and a -inf causal mask, [B, N, H, d]."""
    n = q.shape[1]
    bias = jnp.arange(n, dtype=q.dtype)[None, :] * 0.01
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25 + bias
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def flax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """flax.linen's `dot_product_attention` with an explicit boolean mask."""
    import flax.linen as nn

    return nn.dot_product_attention(q, k, v, mask=mask)


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                    keep: jax.Array) -> jax.Array:
    """Cross attention (Nq ≠ Nk) with a bias argument and a key padding mask."""
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=keep[:, None, None, :],
                                        implementation="xla")


def qkv(shape: tuple[int, ...], dtype: Any = jnp.float32, seed: int = 0,
        kv_shape: tuple[int, ...] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random q, k, v (k and v of `kv_shape` if given)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    kv_shape = kv_shape or shape
    return (jax.random.normal(ks[0], shape, dtype), jax.random.normal(ks[1], kv_shape, dtype),
            jax.random.normal(ks[2], kv_shape, dtype))


def abstract(*arrays: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


def sds(shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)

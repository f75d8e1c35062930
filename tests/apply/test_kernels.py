"""tiermap/kernels/blocked_attention.py against the materialising reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fusion.helpers import qkv
from tiermap.kernels import (
    LogitsTransform,
    attention_reference,
    blocked_attention,
    flash_attention,
)


def grads(fn, *args):
    loss = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))
    return jax.jit(loss)(*args)


@pytest.mark.parametrize(("nq", "nk", "bq", "bk", "causal"), [
    (50, 70, 16, 32, False), (33, 33, 8, 16, True), (40, 24, 16, 8, True),
])
def test_forward_and_gradients_match(nq: int, nk: int, bq: int, bk: int, causal: bool) -> None:
    q, k, v = qkv((2, 3, nq, 16), kv_shape=(2, 3, nk, 16))
    key = jax.random.key(1)
    bias = jax.random.normal(key, (1, 3, nq, nk))
    keep = jax.random.bernoulli(key, 0.8, (2, 1, 1, nk)).at[..., 0].set(True)

    def tiled(q, k, v, b):
        return flash_attention(q, k, v, mask=keep, bias=b, causal=causal, block_q=bq, block_k=bk)

    def ref(q, k, v, b):
        return attention_reference(q, k, v, mask=keep, bias=b, causal=causal)

    np.testing.assert_allclose(jax.jit(tiled)(q, k, v, bias), ref(q, k, v, bias), atol=1e-5)
    for g, r in zip(grads(tiled, q, k, v, bias), grads(ref, q, k, v, bias), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_bf16() -> None:
    q, k, v = qkv((1, 2, 64, 32), dtype=jnp.bfloat16)
    out = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    ref = attention_reference(q, k, v, causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


def test_causal_block_skipping_changes_nothing() -> None:
    q, k, v = qkv((1, 64, 16))
    skip = LogitsTransform((("causal", -1e38),))
    noskip = LogitsTransform((("causal", -1e38), ("mul_const", 1.0)))  # mask isn't last: no skip
    assert skip.skips_causal_blocks
    a = blocked_attention(q, k, v, transform=skip, block_q=16, block_k=16)
    b = blocked_attention(q, k, v, transform=LogitsTransform((("causal", -1e38),)),
                          block_q=64, block_k=64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    c = blocked_attention(q, k, v, transform=noskip, block_q=16, block_k=16)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_separate_backward_blocks() -> None:
    q, k, v = qkv((1, 48, 16))

    def f(bwd):
        return lambda q, k, v: blocked_attention(q, k, v, block_q=16, block_k=16,
                                                 backward_blocks=bwd)

    for a, b in zip(grads(f(None), q, k, v), grads(f((32, 8)), q, k, v), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_no_score_matrix_in_the_compiled_program() -> None:
    n = 2048
    q, k, v = qkv((1, n, 64))
    fn = jax.jit(lambda q, k, v: blocked_attention(q, k, v, block_q=128, block_k=128))
    temp = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * n * 4 / 10

"""The Pallas paths in interpret mode on small shapes (no GPU or TPU here).

GPU `mha` (Triton) and TPU `flash_attention` (Mosaic) both run through Pallas's interpreters on
CPU, forward and backward. What stays untested here: compiling them for real hardware (Triton
and Mosaic lowering, the plan's block sizes' effect on speed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fusion.helpers import jax_attention, qkv
from tiermap.apply import apply_plan


def _check(kernel: str, shape, causal: bool) -> list[str]:
    fn = jax_attention(causal)
    applied = apply_plan(fn, None, kernel=kernel, interpret=True)
    q, k, v = qkv(shape)
    np.testing.assert_allclose(applied(q, k, v), fn(q, k, v), atol=1e-4)
    g_a = jax.grad(lambda *a: jnp.sum(jnp.sin(applied(*a))), argnums=(0, 1, 2))(q, k, v)
    g_r = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_a, g_r, strict=True):
        np.testing.assert_allclose(a, r, atol=1e-4)
    return applied.notes


@pytest.mark.parametrize("causal", [False, True])
def test_gpu_mha_interpret(causal: bool) -> None:
    notes = _check("pallas-gpu", (1, 64, 2, 16), causal)
    assert "Pallas GPU mha (blocks" in notes[0]


def test_tpu_flash_attention_interpret() -> None:
    notes = _check("pallas-tpu", (1, 128, 1, 32), True)
    assert "Pallas TPU flash_attention (blocks 128x128, interpret)" in notes[0]


def test_pallas_falls_back_on_bias() -> None:
    from tests.fusion.helpers import hand_bias_causal

    applied = apply_plan(hand_bias_causal, None, kernel="pallas-gpu", interpret=True)
    q, k, v = qkv((1, 32, 2, 16))
    np.testing.assert_allclose(applied(q, k, v), hand_bias_causal(q, k, v), atol=1e-4)
    assert "not applicable (bias or mask inputs)" in applied.notes[0]

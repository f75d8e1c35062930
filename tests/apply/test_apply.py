"""tiermap.apply: applied programs compute what the originals compute, gradients included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fusion.helpers import (
    cross_attention,
    flax_attention,
    hand_attention,
    hand_bias_causal,
    jax_attention,
    qkv,
)
from tiermap.apply import apply_plan, lower_applied
from tiermap.apply.memory import host_input_positions
from tiermap.errors import TiermapError
from tiermap.pipeline import plan


def assert_same(fn, args, *, atol=1e-4, grad_argnums=(0, 1, 2), plan_=None, **apply_kw):
    applied = apply_plan(fn, plan_, **apply_kw)
    out, ref = applied(*args), fn(*args)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=atol)

    def loss(f):
        return lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))

    g_a = jax.jit(jax.grad(loss(applied), argnums=grad_argnums))(*args)
    g_r = jax.jit(jax.grad(loss(fn), argnums=grad_argnums))(*args)
    for a, r in zip(g_a, g_r, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32),
                                   atol=atol * 10)
    assert any(note.startswith("attention 0:") for note in applied.notes), applied.notes
    return applied


@pytest.mark.parametrize(("shape", "causal"), [
    ((2, 64, 4, 16), False), ((1, 40, 2, 8), True), ((1, 128, 1, 32), True)])
def test_jax_attention(shape, causal) -> None:
    assert_same(jax_attention(causal), qkv(shape))


def test_hand_written() -> None:
    assert_same(hand_attention, qkv((96, 32)))


def test_bias_and_minus_inf_causal_mask() -> None:
    assert_same(hand_bias_causal, qkv((2, 48, 2, 16)))


def test_flax_with_explicit_mask() -> None:
    q, k, v = qkv((2, 32, 2, 16))
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 32, 32)).at[..., 0].set(True)
    assert_same(lambda q, k, v: flax_attention(q, k, v, mask), (q, k, v))


def test_cross_attention_with_bias_and_padding_mask() -> None:
    q, k, v = qkv((2, 24, 4, 16), kv_shape=(2, 40, 4, 16))
    bias = jax.random.normal(jax.random.key(4), (2, 4, 24, 40))
    keep = jax.random.bernoulli(jax.random.key(5), 0.8, (2, 40)).at[:, 0].set(True)
    assert_same(cross_attention, (q, k, v, bias, keep), grad_argnums=(0, 1, 2, 3))


def test_grouped_query_attention() -> None:
    q, k, v = qkv((1, 32, 4, 16), kv_shape=(1, 32, 2, 16))
    assert_same(jax_attention(causal=True), (q, k, v))


def test_bf16() -> None:
    assert_same(jax_attention(causal=True), qkv((1, 64, 2, 32), dtype=jnp.bfloat16), atol=3e-2)


def test_flax_module_inside_scan() -> None:
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            return x + nn.MultiHeadDotProductAttention(num_heads=2)(x, mask=mask), None

    stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    params = stack().init(jax.random.key(1), x, None)

    def fn(p, x):
        return stack().apply(p, x, None)[0]

    applied = apply_plan(fn, None)
    np.testing.assert_allclose(applied(params, x), fn(params, x), atol=1e-4)
    assert applied.notes[0].startswith("attention 0:")


def test_plan_block_sizes_are_used_and_compiled_program_is_small() -> None:
    q, k, v = qkv((1, 512, 2, 64))
    fn = jax_attention()
    sds = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    p = plan(fn, *sds, target="h100", workers=1, time_limit_s=10)
    tile = next(t for t in p.tiles if t.group == "attn0")
    applied = assert_same(fn, (q, k, v), plan_=p)
    blocks = f"blocks {tile.params['block_q']}x{tile.params['block_k']} (plan group attn0)"
    assert blocks in applied.notes[0]
    compiled = applied.lower(q, k, v).compile()
    plain = jax.jit(fn).lower(q, k, v).compile()
    assert (compiled.memory_analysis().temp_size_in_bytes
            < plain.memory_analysis().temp_size_in_bytes)
    assert lower_applied(fn, p, q, k, v).memory_analysis() is not None


def test_static_and_keyword_arguments() -> None:
    q, k, v = qkv((1, 32, 2, 16))

    def fn(q, k, v, causal, *, scale=1.0):
        return jax.nn.dot_product_attention(q * scale, k, v, is_causal=causal,
                                            implementation="xla")

    applied = apply_plan(fn, None, static_argnums=(3,))
    for causal in (False, True):
        np.testing.assert_allclose(applied(q, k, v, causal, scale=0.5),
                                   fn(q, k, v, causal, scale=0.5), atol=1e-5)


@pytest.mark.parametrize("form", ["hand", "jax-causal", "flax-mask", "gqa"])
def test_grad_inside_the_function_is_replaced_too(form: str) -> None:
    if form == "hand":
        fn, args = hand_attention, qkv((64, 16))
    elif form == "jax-causal":
        fn, args = jax_attention(causal=True), qkv((2, 32, 2, 16))
    elif form == "gqa":
        fn, args = jax_attention(causal=True), qkv((1, 32, 4, 16), kv_shape=(1, 32, 2, 16))
    else:
        mask = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 32, 32)).at[..., 0].set(True)

        def fn(q, k, v):
            return flax_attention(q, k, v, mask)

        args = qkv((2, 32, 2, 16))
    grad = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))
    applied = apply_plan(grad, None)
    for a, r in zip(applied(*args), grad(*args), strict=True):
        np.testing.assert_allclose(a, r, atol=1e-5)
    assert "its backward (written by jax.grad) replaced" in applied.notes[0], applied.notes


def test_value_and_grad_of_self_attention() -> None:
    x = qkv((48, 16))[0]
    fn = jax.value_and_grad(lambda x: jnp.sum(hand_attention(x, x, x) ** 2))
    applied = apply_plan(fn, None)
    (val_a, g_a), (val_r, g_r) = applied(x), fn(x)
    np.testing.assert_allclose(val_a, val_r, rtol=1e-5)
    np.testing.assert_allclose(g_a, g_r, atol=1e-4)  # q, k and v cotangents summed
    assert "replaced" in applied.notes[0]


def test_grad_inside_saves_the_score_matrix() -> None:
    q = qkv((1, 2048, 1, 64))[0]
    fn = jax.grad(lambda q, k, v: jnp.sum(jax_attention(True)(q, k, v) ** 2), argnums=(0, 1, 2))
    temp = apply_plan(fn, None).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    plain = jax.jit(fn).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
    assert temp * 10 < plain


def test_dropout_on_the_probabilities_is_left_to_xla_with_a_note() -> None:
    q, k, v = qkv((32, 16))
    keep = jax.random.bernoulli(jax.random.key(7), 0.9, (32, 32))

    def fn(q, k, v):
        p = jax.nn.softmax(q @ k.T)
        return (p * keep / 0.9) @ v

    applied = apply_plan(fn, None)
    np.testing.assert_allclose(applied(q, k, v), fn(q, k, v), atol=1e-5)
    assert "left to XLA" in applied.notes[0] and "of P" in applied.notes[0]


def test_no_attention_runs_as_jit() -> None:
    applied = apply_plan(lambda a, b: jnp.tanh(a @ b), None)
    a = jnp.ones((8, 8))
    np.testing.assert_allclose(applied(a, a), jnp.tanh(a @ a))
    assert "no attention" in applied.notes[0]


def test_unknown_kernel_is_an_error() -> None:
    with pytest.raises(TiermapError, match="kernel="):
        apply_plan(hand_attention, None, kernel="cuda")


def test_host_tier_inputs_use_pinned_host_memory() -> None:
    # A plan that keeps x in the host tier: place x there by hand on a plan from the pipeline.
    from dataclasses import replace

    from tiermap.ir.plan import Residency

    x = jnp.ones((64, 64))
    fn = jax.jit(lambda x, w: jnp.tanh(x @ w))
    sds = jax.ShapeDtypeStruct(x.shape, x.dtype)
    p = plan(fn, sds, sds, target="h100", workers=1, time_limit_s=5)
    x_id = p.program.inputs[0]
    tensors = tuple(replace(t, residency=(Residency("host", 0, t.last_use_step),))
                    if t.id == x_id else t for t in p.tensors)
    p_host = replace(p, tensors=tensors)
    assert host_input_positions(p_host) == [0]
    applied = apply_plan(fn, p_host)
    np.testing.assert_allclose(applied(x, x), fn(x, x), atol=1e-5)
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    if "pinned_host" in kinds:
        assert any("pinned_host" in n for n in applied.notes)


def test_attention_tiles_come_from_the_group_covering_the_same_equations() -> None:
    """Two attentions of different lengths after a plain matmul: each takes the tiles of the plan
    group whose matmuls sit at its own positions among the program's dot_general ops; a plan
    without that record (as read from an older JSON) falls back to searched tiles, saying so."""
    import dataclasses

    from tiermap import Plan

    q, k, v = qkv((1, 256, 2, 64))
    q2, k2, v2 = qkv((1, 512, 2, 64), seed=1)
    w = jnp.eye(64, dtype=q.dtype)
    attend = jax_attention()

    def fn(q, k, v, q2, k2, v2):
        return attend(q @ w, k, v).sum() + attend(q2, k2, v2).sum()

    args = (q, k, v, q2, k2, v2)
    sds = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
    p = plan(fn, *sds, target="h100", workers=1, time_limit_s=10)
    assert [a.matmul_ordinals for a in p.attention] == [(1, 2), (3, 4)]
    assert [(a.q_len, a.kv_len) for a in p.attention] == [(256, 256), (512, 512)]
    again = Plan.from_json(p.to_json())
    assert again.attention == p.attention
    applied = apply_plan(fn, p)
    np.testing.assert_allclose(applied(*args), fn(*args), rtol=1e-4)
    for note, group in zip(applied.notes, p.attention, strict=True):
        tile = next(t for t in p.tiles if t.group == group.group)
        assert f"blocks {tile.params['block_q']}x{tile.params['block_k']} " \
               f"(plan group {group.group})" in note
    bare = apply_plan(fn, dataclasses.replace(p, attention=()))
    bare(*args)
    assert all("(not in the plan)" in note for note in bare.notes)

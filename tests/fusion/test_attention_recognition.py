"""tiermap.fusion.attention: attention in every form is found with its facts, look-alikes not."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from tests.fusion.helpers import (
    cross_attention,
    flax_attention,
    hand_attention,
    hand_bias_causal,
    jax_attention,
    sds,
)
from tiermap.frontend.lowering import lower
from tiermap.fusion.attention import find_attention, pattern_summary

B, N, H, D = 2, 128, 4, 64
BNHD = sds((B, N, H, D))


def one(fn, *args, platform: str = "cpu"):
    patterns = find_attention(lower(fn, *args, platform=platform))
    assert len(patterns) == 1, pattern_summary(patterns)
    return patterns[0]


def test_jax_dot_product_attention_causal() -> None:
    p = one(jax_attention(causal=True), BNHD, BNHD, BNHD)
    assert p.describe() == {"kv_len": N, "q_len": N, "head_dim": D, "v_head_dim": D,
                            "batch_heads": B * H, "causal": True, "masked": False,
                            "bias": False, "dtype": "f32", "backward": False}


def test_hand_written_softmax_attention() -> None:
    p = one(hand_attention, sds((N, D)), sds((N, D)), sds((N, D)))
    assert (p.q_len, p.kv_len, p.head_dim, p.batch_heads, p.causal) == (N, N, D, 1, False)
    # Score-shaped tensors stay on chip, and so does k.T: the kernel reads K blocks in any
    # layout, so the transpose is absorbed and K's role goes to the input itself.
    prog = lower(hand_attention, sds((N, D)), sds((N, D)), sds((N, D)))
    for vid in p.fwd_internal:
        assert prog.values[vid].type.num_elements in (N * N, N * D, N, 1)
    assert (p.q_id, p.k_id, p.v_id) == prog.inputs
    assert p.o_id == prog.outputs[0]


def test_einsum_bias_and_minus_inf_causal_mask() -> None:
    p = one(hand_bias_causal, BNHD, BNHD, BNHD)
    assert p.causal and p.batch_heads == B * H


def test_flax_explicit_mask_bf16() -> None:
    q = sds((B, N, H, D), jnp.bfloat16)
    p = one(flax_attention, q, q, q, sds((B, 1, N, N), jnp.bool_))
    assert p.masked and not p.causal and p.dtype == "bf16"


def test_flax_multi_head_module() -> None:
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
            return nn.MultiHeadDotProductAttention(num_heads=4)(x, mask=mask)

    x = sds((2, 64, 128))
    model = Block()
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    p = one(lambda prm, xx: model.apply(prm, xx), params, x)
    assert (p.q_len, p.kv_len, p.head_dim, p.batch_heads) == (64, 64, 32, 8)


def test_cross_attention_lengths_and_bias() -> None:
    p = one(cross_attention, sds((B, 24, H, D)), BNHD, BNHD, sds((B, H, 24, N)),
            sds((B, N), jnp.bool_))
    assert (p.q_len, p.kv_len) == (24, N)
    assert p.masked and p.bias


def test_grouped_query_attention_folds_groups_into_queries() -> None:
    kv = sds((B, N, 2, D))
    p = one(jax_attention(), BNHD, kv, kv)
    assert (p.q_len, p.kv_len, p.batch_heads) == (2 * N, N, B * 2)


@pytest.mark.parametrize("form", ["hand", "jax", "flax"])
def test_backward_from_jax_grad_is_its_own_group(form: str) -> None:
    if form == "hand":
        fn, args = hand_attention, (sds((N, D)),) * 3
    elif form == "jax":
        fn, args = jax_attention(causal=True), (BNHD,) * 3
    else:
        def fn(q, k, v):
            return flax_attention(q, k, v, jnp.ones((1, 1, N, N), bool))
        args = (BNHD,) * 3
    grad = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))
    prog = lower(grad, *args)
    (p,) = find_attention(prog)
    assert p.bwd_op_ids and p.describe()["backward"]
    assert not set(p.fwd_op_ids) & set(p.bwd_op_ids)
    kinds = [prog.op(o).kind for o in p.bwd_op_ids]
    assert kinds.count("stablehlo.dot_general") >= 3  # dP, dV, dQ/dK products
    # P is recomputed by the backward, never stored; dO is a backward input.
    assert p.recomputed and p.recomputed <= p.fwd_internal
    assert p.do_id is not None and p.do_id not in p.bwd_internal
    # dQ, dK, dV leave the group.
    for out in prog.outputs:
        assert out not in p.bwd_internal


def test_two_attentions_in_order() -> None:
    def two(q, k, v):
        return hand_attention(hand_attention(q, k, v), k, v)

    patterns = find_attention(lower(two, *(sds((N, D)),) * 3))
    assert [p.index for p in patterns] == [0, 1]
    assert patterns[0].o_id != patterns[1].o_id


def test_softmax_without_second_product_is_not_attention() -> None:
    assert find_attention(lower(lambda q, k: jax.nn.softmax(q @ k.T), sds((N, D)),
                                sds((N, D)))) == ()


def test_two_unrelated_matmuls_are_not_attention() -> None:
    assert find_attention(lower(lambda a, b, c: (a @ b.T) @ c, *(sds((N, D)),) * 3)) == ()


def test_probabilities_read_elsewhere_are_not_fused() -> None:
    def leaky(q, k, v):
        p = jax.nn.softmax(q @ k.T)
        return p @ v, p.sum()

    assert find_attention(lower(leaky, *(sds((N, D)),) * 3)) == ()


def test_exp_without_normalisation_is_not_attention() -> None:
    assert find_attention(lower(lambda q, k, v: jnp.exp(q @ k.T) @ v,
                                *(sds((N, D)),) * 3)) == ()

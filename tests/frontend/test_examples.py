"""The bundled example models run, learn, and agree between attention implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiermap.examples import models
from tiermap.examples.transformer_train import build

TINY = models.TransformerConfig(layers=1, d_model=16, heads=2, seq=8, batch=2, vocab=32)


def _batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    tokens = jax.random.randint(key, (TINY.batch, TINY.seq), 0, TINY.vocab)
    return tokens, jnp.roll(tokens, -1, axis=1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_step_lowers_the_loss(optimizer: str) -> None:
    params = models.init_params(TINY, jax.random.key(0))
    state = models.init_adam(params) if optimizer == "adam" else None
    tokens, targets = _batch(jax.random.key(1))
    step = jax.jit(lambda p, s: models.train_step(TINY, p, s, tokens, targets, lr=0.05
                                                  if optimizer == "sgd" else 3e-3))
    losses = []
    for _ in range(5):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_attention_implementations_agree() -> None:
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))

    @jax.jit
    def both(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(models.scaled_dot_product_attention(q, k, v, causal=causal, impl=impl)
                     for causal in (False, True) for impl in ("hand", "jax"))

    hand, ref, hand_causal, ref_causal = both(q, k, v)
    np.testing.assert_allclose(hand, ref, atol=1e-5)
    np.testing.assert_allclose(hand_causal, ref_causal, atol=1e-5)


def test_builders_return_abstract_arguments_that_run() -> None:
    for fn, args in (models.mlp(batch=2, sizes=(8, 4)),
                     models.attention(n=16, d=8, heads=2, causal=True),
                     models.transformer_forward(layers=1, d_model=16, heads=2, seq=8, batch=1,
                                                vocab=32)):
        leaves = jax.tree.leaves(args)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
        concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), args)
        out = jax.jit(fn)(*concrete)
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(out))


def test_make_run_builder_is_the_12_layer_training_step() -> None:
    fn, args = build()
    params = args[0]
    assert len(params["blocks"]) == 12
    assert params["tok_emb"].shape == (1024, 256)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        models.TransformerConfig(d_model=30, heads=4)
    with pytest.raises(ValueError, match="optimizer"):
        models.transformer_train(optimizer="lion")

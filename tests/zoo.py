"""Real-model zoo for tests and benchmarks: each builder returns `(fn, args)`.

`args` is a tuple of pytrees of `jax.ShapeDtypeStruct`, so nothing is computed: the models are only
traced and lowered. Uses the test extras (flax, optax, dm-haiku, equinox).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Builder = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


# --- flax transformer ----------------------------------------------------------------------------


def _flax_model(layers: int, d_model: int, heads: int, vocab: int, dropout: float) -> Any:
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
            causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
            h = nn.LayerNorm()(x)
            h = nn.MultiHeadDotProductAttention(
                num_heads=heads, dropout_rate=dropout, deterministic=deterministic)(h, mask=causal)
            x = x + nn.Dropout(dropout, deterministic=deterministic)(h)
            h = nn.LayerNorm()(x)
            h = nn.Dense(4 * d_model)(h)
            h = nn.gelu(h, approximate=False)
            h = nn.Dense(d_model)(h)
            return x + nn.Dropout(dropout, deterministic=deterministic)(h)

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
            embed = nn.Embed(vocab, d_model)
            pos = self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], d_model))
            x = embed(tokens) + pos[None]
            for _ in range(layers):
                x = Block()(x, deterministic)
            x = nn.LayerNorm()(x)
            return embed.attend(x)

    return Transformer()


def flax_transformer_forward(layers: int = 2, d_model: int = 128, heads: int = 4, seq: int = 64,
                             batch: int = 4, vocab: int = 512) -> tuple[Callable[..., Any], tuple]:
    """flax.linen GPT-style decoder, inference (no dropout): fn(params, tokens) -> logits."""
    model = _flax_model(layers, d_model, heads, vocab, dropout=0.0)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def flax_forward(params: Any, tokens: jax.Array) -> jax.Array:
        return model.apply(params, tokens)

    return flax_forward, (_abstract(params), tokens)


def flax_transformer_train(layers: int = 2, d_model: int = 128, heads: int = 4, seq: int = 64,
                           batch: int = 4, vocab: int = 512, dropout: float = 0.1
                           ) -> tuple[Callable[..., Any], tuple]:
    """flax.linen decoder training step with dropout and optax Adam.

    fn(params, opt_state, tokens, targets, key) -> (params, opt_state, loss).
    """
    import optax

    model = _flax_model(layers, d_model, heads, vocab, dropout=dropout)
    opt = optax.adam(1e-3)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    opt_state = jax.eval_shape(opt.init, params)

    def flax_train_step(params: Any, opt_state: Any, tokens: jax.Array, targets: jax.Array,
                        key: jax.Array) -> tuple[Any, Any, jax.Array]:
        def loss_fn(p: Any) -> jax.Array:
            logits = model.apply(p, tokens, deterministic=False, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return flax_train_step, (_abstract(params), _abstract(opt_state), tokens, tokens, key)


# --- haiku ResNet-50 -----------------------------------------------------------------------------


def _resnet(batch: int, image_px: int, classes: int) -> tuple[Any, Any, Any, Any]:
    import haiku as hk

    def net(x: jax.Array, is_training: bool) -> jax.Array:
        return hk.nets.ResNet50(classes)(x, is_training=is_training)

    model = hk.transform_with_state(net)
    images = jax.ShapeDtypeStruct((batch, image_px, image_px, 3), jnp.float32)
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(
        images.shape), is_training=True))
    return model, _abstract(params), _abstract(state), images


def haiku_resnet50_forward(batch: int = 2, image_px: int = 64, classes: int = 100
                           ) -> tuple[Callable[..., Any], tuple]:
    """dm-haiku ResNet-50 inference: fn(params, state, images) -> logits."""
    model, params, state, images = _resnet(batch, image_px, classes)

    def resnet50_forward(params: Any, state: Any, images: jax.Array) -> jax.Array:
        logits, _ = model.apply(params, state, None, images, is_training=False)
        return logits

    return resnet50_forward, (params, state, images)


def haiku_resnet50_train(batch: int = 2, image_px: int = 64, classes: int = 100
                         ) -> tuple[Callable[..., Any], tuple]:
    """ResNet-50 training step (batch norm in training mode, SGD): returns (params, state, loss)."""
    model, params, state, images = _resnet(batch, image_px, classes)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def resnet50_train_step(params: Any, state: Any, images: jax.Array, labels: jax.Array
                            ) -> tuple[Any, Any, jax.Array]:
        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            logits, new_state = model.apply(p, state, None, images, is_training=True)
            onehot = jax.nn.one_hot(labels, classes)
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return new_params, new_state, loss

    return resnet50_train_step, (params, state, images, labels)


# --- equinox MLP ---------------------------------------------------------------------------------


def equinox_mlp(batch: int = 32, in_size: int = 256, width: int = 512, depth: int = 3,
                out_size: int = 10) -> tuple[Callable[..., Any], tuple]:
    """equinox.nn.MLP vmapped over a batch: fn(params, x) -> y (params: the array leaves)."""
    import equinox as eqx

    mlp = eqx.filter_eval_shape(eqx.nn.MLP, in_size, out_size, width, depth,
                                key=jax.random.key(0))
    params, static = eqx.partition(mlp, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))

    def equinox_mlp_forward(params: Any, x: jax.Array) -> jax.Array:
        model = eqx.combine(params, static)
        return jax.vmap(model)(x)

    x = jax.ShapeDtypeStruct((batch, in_size), jnp.float32)
    return equinox_mlp_forward, (params, x)


# --- jax.nn.dot_product_attention ----------------------------------------------------------------


def _qkv(batch: int, n: int, heads: int, d: int) -> tuple[Any, Any, Any]:
    spec = jax.ShapeDtypeStruct((batch, n, heads, d), jnp.float32)
    return spec, spec, spec


def jax_attention_forward(batch: int = 2, n: int = 256, heads: int = 4, d: int = 64,
                          causal: bool = True) -> tuple[Callable[..., Any], tuple]:
    """`jax.nn.dot_product_attention` forward: fn(q, k, v) -> out."""

    def sdpa_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)

    return sdpa_forward, _qkv(batch, n, heads, d)


def jax_attention_backward(batch: int = 2, n: int = 256, heads: int = 4, d: int = 64,
                           causal: bool = True) -> tuple[Callable[..., Any], tuple]:
    """Gradient of sum(attention(q, k, v)²) with respect to q, k and v."""

    def sdpa_backward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        def f(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return jnp.sum(jnp.square(jax.nn.dot_product_attention(q, k, v, is_causal=causal)))

        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    return sdpa_backward, _qkv(batch, n, heads, d)


# --- control flow and escape hatches -------------------------------------------------------------


def scan_rnn(steps: int = 16, batch: int = 8, width: int = 64) -> tuple[Callable[..., Any], tuple]:
    """An Elman RNN over `steps` inputs with `lax.scan`: fn(w, xs) -> last hidden state."""

    def rnn(w: jax.Array, xs: jax.Array) -> jax.Array:
        def cell(h: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
            return jnp.tanh(h @ w + x), None

        h, _ = jax.lax.scan(cell, jnp.zeros((batch, width)), xs)
        return h

    return rnn, (jax.ShapeDtypeStruct((width, width), jnp.float32),
                 jax.ShapeDtypeStruct((steps, batch, width), jnp.float32))


def fori_power(trips: int = 10, n: int = 32) -> tuple[Callable[..., Any], tuple]:
    """`lax.fori_loop` applying a matmul `trips` times."""

    def power(a: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, trips, lambda i, y: jnp.sin(a @ y), x)

    return power, (jax.ShapeDtypeStruct((n, n), jnp.float32),
                   jax.ShapeDtypeStruct((n, 4), jnp.float32))


def cond_branches(n: int = 64) -> tuple[Callable[..., Any], tuple]:
    """`lax.cond` choosing between an expensive and a cheap branch (lowers to stablehlo.case)."""

    def branchy(p: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.cond(p > 0, lambda y: jnp.exp(y @ y) + 1.0, lambda y: y * 2.0, x)

    return branchy, (jax.ShapeDtypeStruct((), jnp.float32),
                     jax.ShapeDtypeStruct((n, n), jnp.float32))


def eigh_custom_call(n: int = 16) -> tuple[Callable[..., Any], tuple]:
    """`jnp.linalg.eigh` (a lapack custom_call on cpu) followed by a matmul."""

    def eig_project(a: jax.Array) -> jax.Array:
        w, v = jnp.linalg.eigh(a @ a.T)
        return v @ jnp.diag(w) @ v.T

    return eig_project, (jax.ShapeDtypeStruct((n, n), jnp.float32),)


def pure_callback_fn(n: int = 64) -> tuple[Callable[..., Any], tuple]:
    """A host `jax.pure_callback` between two jnp ops."""
    import numpy as np

    def with_callback(x: jax.Array) -> jax.Array:
        y = jax.pure_callback(lambda a: np.sort(a), jax.ShapeDtypeStruct(x.shape, x.dtype), x * 2)
        return jnp.sum(y)

    return with_callback, (jax.ShapeDtypeStruct((n,), jnp.float32),)


# Models whose FLOPs must agree with XLA's cost analysis; name -> builder.
MODELS: dict[str, Builder] = {
    "flax_transformer_forward": flax_transformer_forward,
    "flax_transformer_train": flax_transformer_train,
    "haiku_resnet50_forward": haiku_resnet50_forward,
    "haiku_resnet50_train": haiku_resnet50_train,
    "equinox_mlp": equinox_mlp,
    "jax_attention_forward": jax_attention_forward,
    "jax_attention_backward": jax_attention_backward,
    "scan_rnn": scan_rnn,
    "fori_power": fori_power,
    "cond_branches": cond_branches,
    "eigh_custom_call": eigh_custom_call,
    "pure_callback": pure_callback_fn,
}

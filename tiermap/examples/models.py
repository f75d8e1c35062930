"""Pure-JAX example models: a GPT-style decoder transformer, an MLP and attention.

Only `jax` and `jax.numpy` are used, so `make run` works without the test extras. Every builder
returns `(fn, args)` with `args` a tuple of pytrees of `jax.ShapeDtypeStruct`, ready for
`tiermap.lower(fn, *args)` or `jax.jit(fn).lower(*args)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp

Params = dict[str, Any]
AttentionImpl = Literal["hand", "jax"]


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a GPT-style decoder.

    Attributes:
        layers: number of decoder blocks.
        d_model: width of the residual stream.
        heads: attention heads (d_model must divide evenly).
        seq: tokens per sequence.
        batch: sequences per step.
        vocab: vocabulary size (tied input/output embedding).
        dtype: parameter and activation dtype name ("float32", "bfloat16").
        attention: "hand" (einsum + softmax) or "jax" (`jax.nn.dot_product_attention`).
        mlp_ratio: hidden width of the MLP as a multiple of d_model.
        bias: whether the dense layers have biases (LayerNorm always has one).
        scan: the blocks' parameters stacked along a leading layer axis and the blocks run by
            `lax.scan` (as flax `nn.scan`, MaxText and Levanter write them), instead of a
            Python loop over a list of blocks.
    """

    layers: int = 12
    d_model: int = 256
    heads: int = 4
    seq: int = 256
    batch: int = 8
    vocab: int = 1024
    dtype: str = "float32"
    attention: AttentionImpl = "hand"
    mlp_ratio: int = 4
    bias: bool = False
    scan: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.attention not in ("hand", "jax"):
            raise ValueError(f"attention={self.attention!r}: expected 'hand' or 'jax'")


# --- building blocks ---------------------------------------------------------------------------


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def scaled_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True,
                                 impl: AttentionImpl = "hand") -> jax.Array:
    """Multi-head scaled dot-product attention on [batch, seq, heads, head_dim] arrays."""
    if impl == "jax":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
    if causal:
        n_q, n_k = q.shape[1], k.shape[1]
        mask = jnp.tril(jnp.ones((n_q, n_k), dtype=bool))
        logits = jnp.where(mask, logits, jnp.asarray(-1e9, logits.dtype))
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _dense_init(key: jax.Array, fan_in: int, fan_out: int, dtype: Any) -> jax.Array:
    return (jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)).astype(
        dtype)


def init_params(cfg: TransformerConfig, key: jax.Array) -> Params:
    """Random parameters for `cfg`: embeddings plus one dict per block."""
    dtype = jnp.dtype(cfg.dtype)
    d, hidden = cfg.d_model, cfg.d_model * cfg.mlp_ratio
    keys = jax.random.split(key, 2 + cfg.layers)
    blocks = []
    for i in range(cfg.layers):
        k_qkv, k_o, k_1, k_2 = jax.random.split(keys[2 + i], 4)
        block = {
            "ln1_scale": jnp.ones((d,), dtype), "ln1_bias": jnp.zeros((d,), dtype),
            "w_qkv": _dense_init(k_qkv, d, 3 * d, dtype), "w_o": _dense_init(k_o, d, d, dtype),
            "ln2_scale": jnp.ones((d,), dtype), "ln2_bias": jnp.zeros((d,), dtype),
            "w_1": _dense_init(k_1, d, hidden, dtype), "w_2": _dense_init(k_2, hidden, d, dtype),
        }
        if cfg.bias:
            block.update({
                "b_qkv": jnp.zeros((3 * d,), dtype), "b_o": jnp.zeros((d,), dtype),
                "b_1": jnp.zeros((hidden,), dtype), "b_2": jnp.zeros((d,), dtype),
            })
        blocks.append(block)
    stacked: Any = blocks
    if cfg.scan:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    return {
        "tok_emb": (0.02 * jax.random.normal(keys[0], (cfg.vocab, d))).astype(dtype),
        "pos_emb": (0.02 * jax.random.normal(keys[1], (cfg.seq, d))).astype(dtype),
        "ln_f_scale": jnp.ones((d,), dtype), "ln_f_bias": jnp.zeros((d,), dtype),
        "blocks": stacked,
    }


def _dense(p: Params, name: str, x: jax.Array) -> jax.Array:
    y = x @ p["w_" + name]
    return y + p["b_" + name] if "b_" + name in p else y


def _block(cfg: TransformerConfig, p: Params, x: jax.Array) -> jax.Array:
    b, s, d = x.shape
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"])
    qkv = _dense(p, "qkv", h).reshape(b, s, 3, cfg.heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = scaled_dot_product_attention(q, k, v, causal=True, impl=cfg.attention)
    x = x + _dense(p, "o", a.reshape(b, s, d))
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"])
    h = jax.nn.gelu(_dense(p, "1", h), approximate=True)
    return x + _dense(p, "2", h)


def forward(cfg: TransformerConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Logits [batch, seq, vocab] for integer `tokens` [batch, seq]."""
    x = params["tok_emb"][tokens] + params["pos_emb"][None, : tokens.shape[1]]
    if cfg.scan:
        x, _ = jax.lax.scan(lambda h, p: (_block(cfg, p, h), None), x, params["blocks"])
    else:
        for p in params["blocks"]:
            x = _block(cfg, p, x)
    x = layer_norm(x, params["ln_f_scale"], params["ln_f_bias"])
    return x @ params["tok_emb"].T


def loss(cfg: TransformerConfig, params: Params, tokens: jax.Array,
         targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy with integer labels (computed in float32)."""
    logits = forward(cfg, params, tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.mean(picked)


def sgd_update(params: Params, grads: Params, lr: float) -> Params:
    """Plain SGD: p ← p − lr·g."""
    return jax.tree.map(lambda p, g: p - jnp.asarray(lr, p.dtype) * g, params, grads)


def adam_update(params: Params, grads: Params, state: Params, lr: float, b1: float = 0.9,
                b2: float = 0.999, eps: float = 1e-8) -> tuple[Params, Params]:
    """Adam with bias correction, written in jnp. `state` holds "mu", "nu" and "count"."""
    count = state["count"] + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
    nu = jax.tree.map(lambda n, g: b2 * n + (1 - b2) * jnp.square(g), state["nu"], grads)
    c = count.astype(jnp.float32)
    corr1 = 1 - b1 ** c
    corr2 = 1 - b2 ** c

    def step(p: jax.Array, m: jax.Array, n: jax.Array) -> jax.Array:
        upd = (m / corr1) / (jnp.sqrt(n / corr2) + eps)
        return (p - lr * upd).astype(p.dtype)

    new_params = jax.tree.map(step, params, mu, nu)
    return new_params, {"mu": mu, "nu": nu, "count": count}


def init_adam(params: Params) -> Params:
    """Zero Adam state for `params`."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"mu": zeros, "nu": jax.tree.map(jnp.zeros_like, params),
            "count": jnp.zeros((), jnp.int32)}


def train_step(cfg: TransformerConfig, params: Params, opt_state: Params | None,
               tokens: jax.Array, targets: jax.Array, lr: float = 1e-3
               ) -> tuple[Params, Params | None, jax.Array]:
    """One optimiser step: Adam when `opt_state` is given, else SGD.

    Returns:
        (new params, new optimiser state or None, loss before the step).
    """
    value, grads = jax.value_and_grad(lambda p: loss(cfg, p, tokens, targets))(params)
    if opt_state is None:
        return sgd_update(params, grads, lr), None, value
    new_params, new_state = adam_update(params, grads, opt_state, lr)
    return new_params, new_state, value


# --- builders: (fn, args) with ShapeDtypeStruct pytrees -----------------------------------------


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _abstract_params(cfg: TransformerConfig) -> Params:
    return _abstract(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


def transformer_forward(layers: int = 12, d_model: int = 256, heads: int = 4, seq: int = 256,
                        batch: int = 8, vocab: int = 1024, dtype: str = "float32",
                        attention_impl: AttentionImpl = "hand", bias: bool = False,
                        scan: bool = False) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The decoder's forward pass: fn(params, tokens) -> logits (`scan`: blocks by lax.scan)."""
    cfg = TransformerConfig(layers, d_model, heads, seq, batch, vocab, dtype, attention_impl,
                            bias=bias, scan=scan)

    def transformer_forward(params: Params, tokens: jax.Array) -> jax.Array:
        return forward(cfg, params, tokens)

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return transformer_forward, (_abstract_params(cfg), tokens)


def transformer_train(layers: int = 12, d_model: int = 256, heads: int = 4, seq: int = 256,
                      batch: int = 8, vocab: int = 1024, dtype: str = "float32",
                      attention_impl: AttentionImpl = "hand", optimizer: str = "sgd",
                      bias: bool = False, scan: bool = False
                      ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """One training step with integer-label cross-entropy (`scan`: blocks by lax.scan).

    With `optimizer="sgd"`: fn(params, tokens, targets) -> (params, loss). With "adam":
    fn(params, opt_state, tokens, targets) -> (params, opt_state, loss).
    """
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}: expected 'adam' or 'sgd'")
    cfg = TransformerConfig(layers, d_model, heads, seq, batch, vocab, dtype, attention_impl,
                            bias=bias, scan=scan)
    params = _abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    if optimizer == "sgd":

        def transformer_train_step(params: Params, tokens: jax.Array, targets: jax.Array
                                   ) -> tuple[Params, jax.Array]:
            new_params, _, value = train_step(cfg, params, None, tokens, targets)
            return new_params, value

        return transformer_train_step, (params, tokens, tokens)

    def transformer_train_step_adam(params: Params, opt_state: Params, tokens: jax.Array,
                                    targets: jax.Array) -> tuple[Params, Params, jax.Array]:
        new_params, new_state, value = train_step(cfg, params, opt_state, tokens, targets)
        return new_params, new_state if new_state is not None else opt_state, value

    state = _abstract(jax.eval_shape(init_adam, params))
    return transformer_train_step_adam, (params, state, tokens, tokens)


def mlp(batch: int = 64, sizes: tuple[int, ...] = (512, 1024, 1024, 10),
        dtype: str = "float32") -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A ReLU MLP: fn(params, x) -> logits, params a list of (w, b)."""
    dt = jnp.dtype(dtype)
    params = [(jax.ShapeDtypeStruct((a, b), dt), jax.ShapeDtypeStruct((b,), dt))
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def mlp_forward(params: list[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
        for i, (w, b) in enumerate(params):
            x = x @ w + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    return mlp_forward, (params, jax.ShapeDtypeStruct((batch, sizes[0]), dt))


def attention(n: int = 1024, d: int = 64, heads: int = 8, batch: int = 1,
                 causal: bool = False, dtype: str = "float32", impl: AttentionImpl = "hand"
                 ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """Standalone attention: fn(q, k, v) -> out, each [batch, n, heads, d]."""
    spec = jax.ShapeDtypeStruct((batch, n, heads, d), jnp.dtype(dtype))

    def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return scaled_dot_product_attention(q, k, v, causal=causal, impl=impl)

    return attention_forward, (spec, spec, spec)


def regularised_attention_train(n: int = 128, d: int = 32, heads: int = 2, width: int = 64,
                                batch: int = 2) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """An attention training step whose loss also reads the probabilities (a regulariser on
    them): jax.grad's backward then reads P from outside the attention, the backward shape
    keras-hub's GPT-2 was reported with. fn(ws [3, width, width], x [batch, n, width]) ->
    (loss, updated ws)."""

    def regularised_attention_step(ws: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        def loss_of(w: jax.Array) -> jax.Array:
            q, k, v = ((x @ w[i]).reshape(batch, n, heads, d) for i in range(3))
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d).astype(x.dtype)
            p = jax.nn.softmax(s, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(batch, n, heads * d)
            return jnp.sum(out ** 2) + 1e-3 * jnp.sum(p * p)

        value, grad = jax.value_and_grad(loss_of)(ws)
        return value, ws - 1e-2 * grad

    return regularised_attention_step, (jax.ShapeDtypeStruct((3, width, width), jnp.float32),
                                        jax.ShapeDtypeStruct((batch, n, width), jnp.float32))

"""Sharded GPT training steps for 8 devices: data-parallel, FSDP-style and tensor-parallel.

One small GPT decoder (separate q/k/v projections so that a head never straddles two devices),
SGD, integer-label cross-entropy, sharded over a 1-D mesh of all devices (axis "x"):

- "dp": parameters replicated, the batch split over devices: XLA all-reduces the gradients.
- "fsdp": parameters split along their first axis (ZeRO-3 style) and the batch split too: XLA
  all-gathers each weight where it is used and reduce-scatters (or all-reduces and slices) its
  gradient.
- "tp": Megatron-style tensor parallelism: q/k/v and the first MLP weight split by columns (one
  group of heads per device), the attention output and second MLP weight by rows; batch and
  embeddings replicated: XLA all-reduces the activations twice per block forward and twice back.

`sharded_train_step(style, mesh)` returns (fn, args): args are `jax.ShapeDtypeStruct`s with
`NamedSharding`s; `init_sharded(args, seed)` makes real arrays with the same shardings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tiermap.examples.models import layer_norm

Params = dict[str, Any]
STYLES: tuple[str, ...] = ("dp", "fsdp", "tp")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the sharded GPT: `heads` and `batch` divisible by the device count."""

    layers: int = 2
    d_model: int = 256
    heads: int = 8
    seq: int = 64
    batch: int = 16
    vocab: int = 512
    mlp_ratio: int = 4
    dtype: str = "float32"
    lr: float = 1e-2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def _block_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, hid = cfg.d_model, cfg.d_model * cfg.mlp_ratio
    return {"ln1_scale": (d,), "ln1_bias": (d,), "w_q": (d, d), "w_k": (d, d), "w_v": (d, d),
            "w_o": (d, d), "ln2_scale": (d,), "ln2_bias": (d,), "w_1": (d, hid),
            "w_2": (hid, d)}


def _specs(style: str, name: str, rank: int) -> P:
    """The PartitionSpec of one parameter in `style`."""
    if style == "dp":
        return P()
    if style == "fsdp":
        return P("x") if rank >= 1 and name not in ("pos_emb",) else P()
    # tp: column-parallel q/k/v/w_1, row-parallel w_o/w_2, the rest replicated
    if name in ("w_q", "w_k", "w_v", "w_1"):
        return P(None, "x")
    if name in ("w_o", "w_2"):
        return P("x", None)
    return P()


def abstract_params(cfg: GPTConfig, style: str, mesh: Mesh) -> Params:
    """ShapeDtypeStructs of the parameters, each with its NamedSharding for `style`."""
    dt = jnp.dtype(cfg.dtype)

    def spec(name: str, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt,
                                    sharding=NamedSharding(mesh, _specs(style, name, len(shape))))

    d = cfg.d_model
    blocks = [{k: spec(k, s) for k, s in _block_shapes(cfg).items()} for _ in range(cfg.layers)]
    return {"tok_emb": spec("tok_emb", (cfg.vocab, d)), "pos_emb": spec("pos_emb", (cfg.seq, d)),
            "ln_f_scale": spec("ln_f_scale", (d,)), "ln_f_bias": spec("ln_f_bias", (d,)),
            "blocks": blocks}


def _attention(cfg: GPTConfig, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, s, _ = q.shape
    shape = (b, s, cfg.heads, cfg.head_dim)
    q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
    mask = jnp.tril(jnp.ones((s, s), dtype=bool))
    logits = jnp.where(mask, logits, jnp.asarray(-1e9, logits.dtype))
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(b, s, cfg.d_model)


def forward(cfg: GPTConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Logits [batch, seq, vocab] (tied embedding)."""
    x = params["tok_emb"][tokens] + params["pos_emb"][None]
    for p in params["blocks"]:
        h = layer_norm(x, p["ln1_scale"], p["ln1_bias"])
        x = x + _attention(cfg, h @ p["w_q"], h @ p["w_k"], h @ p["w_v"]) @ p["w_o"]
        h = layer_norm(x, p["ln2_scale"], p["ln2_bias"])
        x = x + jax.nn.gelu(h @ p["w_1"], approximate=True) @ p["w_2"]
    x = layer_norm(x, params["ln_f_scale"], params["ln_f_bias"])
    return x @ params["tok_emb"].T


def sharded_train_step(style: str, mesh: Mesh, cfg: GPTConfig | None = None
                       ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """(step, (params, tokens, targets)) for `style` ("dp", "fsdp" or "tp") on `mesh` (axis "x").

    step(params, tokens, targets) -> (new params, loss), SGD at `cfg.lr`."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {', '.join(STYLES)}")
    cfg = cfg or GPTConfig()
    params = abstract_params(cfg, style, mesh)
    batch_spec = P() if style == "tp" else P("x")
    tokens = jax.ShapeDtypeStruct((cfg.batch, cfg.seq), jnp.int32,
                                  sharding=NamedSharding(mesh, batch_spec))

    def loss(p: Params, tok: jax.Array, tgt: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(forward(cfg, p, tok).astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], axis=-1))

    def gpt_train_step(p: Params, tok: jax.Array, tgt: jax.Array) -> tuple[Params, jax.Array]:
        value, grads = jax.value_and_grad(loss)(p, tok, tgt)
        lr = jnp.asarray(cfg.lr, jnp.dtype(cfg.dtype))
        return jax.tree.map(lambda a, g: a - lr * g, p, grads), value

    gpt_train_step.__name__ = f"gpt_{style}_train_step"
    return gpt_train_step, (params, tokens, tokens)


def init_sharded(args: Any, seed: int = 0, vocab: int | None = None) -> Any:
    """Real arrays for ShapeDtypeStruct `args`, placed with their shardings: normal(0, 0.05)
    floats, integers uniform in [0, vocab) (vocab: the first float arg's leading size if None)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    top = vocab or 2
    out = []
    for key, leaf in zip(keys, leaves, strict=True):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            value = jax.random.randint(key, leaf.shape, 0, top, leaf.dtype)
        else:
            value = (0.05 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)
        out.append(jax.device_put(value, leaf.sharding))
    return jax.tree_util.tree_unflatten(tree, out)


def _mesh_of_all_devices() -> Mesh:
    return jax.make_mesh((len(jax.devices()),), ("x",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def build_dp() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The data-parallel step over every device (for `tiermap compile ...:build_dp`)."""
    return sharded_train_step("dp", _mesh_of_all_devices())


def build_fsdp() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The FSDP-style step over every device."""
    return sharded_train_step("fsdp", _mesh_of_all_devices())


def build_tp() -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The tensor-parallel step over every device."""
    return sharded_train_step("tp", _mesh_of_all_devices())

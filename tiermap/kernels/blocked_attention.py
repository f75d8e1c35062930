"""Blocked (FlashAttention-style) attention in plain JAX, with a recomputing backward.

Forward (FlashAttention-2 loop order): for each query block of `block_q` rows, loop over key/value
blocks of `block_k` rows keeping the running row maximum `m`, the running denominator `l` and the
unnormalised output on chip (online softmax); the `Nq × Nk` score matrix never exists in full.
The forward saves only O and the log-sum-exp `lse = m + log l` per query row.

Backward (FlashAttention Algorithm 4 order, `jax.custom_vjp`): `D = rowsum(dO ∘ O)`; for each
key/value block, loop over query blocks, recompute `P = exp(logits − lse)` blockwise, and
accumulate `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ − D)`, `dQ += dS K`, `dK += dSᵀ Q` (the logits
transform's own derivative — scale, masks, bias — is applied to `dS` with `jax.vjp` per block).

What turns raw scores `s = q·kᵀ` into logits is a `LogitsTransform`: a list of elementwise steps
(scale, bias, masks, causal mask) replayed on every block, so any order of scale/mask/bias that a
program uses is reproduced exactly. Side inputs (biases, masks) have shape `[Nq | 1, Nk | 1]` and
are sliced blockwise, never broadcast to the full score shape.

Everything runs in float32 inside the kernel; outputs take the dtype of `v` (or `out_dtype`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

# Step kinds of a LogitsTransform (each a tuple whose first item is the kind):
#   ("mul_const", c) ("div_const", c)           logits ∘ c with a Python float
#   ("add", i) ("sub", i) ("mul", i) ("div", i)   logits ∘ side i (a float array)
#   ("rsub", i) ("rdiv", i)                       side i ∘ logits
#   ("where", i, fill, keep_on_true)             where(side i == keep_on_true, logits, fill)
#   ("causal", fill)                             where(k_pos <= q_pos, logits, fill)
#   ("cast", dtype)                              round logits to dtype (kept in float32)
_SIDE_ARITH = ("add", "sub", "mul", "div", "rsub", "rdiv")
_SKIP_FILL_BELOW = -1e30  # a causal fill at or below this adds exp(fill - m) == 0 exactly


@dataclass(frozen=True)
class LogitsTransform:
    """Elementwise map from raw scores `s = q·kᵀ` to softmax logits, replayed per block.

    Attributes:
        steps: the steps in program order (see the module's step table).
    """

    steps: tuple[tuple[Any, ...], ...] = ()

    @staticmethod
    def standard(scale: float | None = None, causal: bool = False, bias: bool = False,
                 mask: bool = False, fill: float = -math.inf) -> LogitsTransform:
        """`scale·s (+ bias side 0) (masked where side 1 is False) (causal)`."""
        steps: list[tuple[Any, ...]] = []
        if scale is not None and scale != 1.0:
            steps.append(("mul_const", float(scale)))
        if bias:
            steps.append(("add", 0))
        if mask:
            steps.append(("where", 1 if bias else 0, float(fill), True))
        if causal:
            steps.append(("causal", float(fill)))
        return LogitsTransform(tuple(steps))

    @property
    def causal(self) -> bool:
        """Whether a causal (top-left aligned) mask is one of the steps."""
        return any(step[0] == "causal" for step in self.steps)

    @property
    def skips_causal_blocks(self) -> bool:
        """Whether blocks above the diagonal may be skipped without changing any result.

        True when the causal mask is the only mask and its fill underflows `exp` to zero (so a
        skipped block contributes exactly nothing and no row is fully masked).
        """
        causal = [s for s in self.steps if s[0] == "causal"]
        others = [s for s in self.steps if s[0] == "where"]
        return bool(causal) and not others and all(s[1] <= _SKIP_FILL_BELOW for s in causal)

    @property
    def scale(self) -> float | None:
        """The single constant scale, when the steps are `mul_const`/`div_const` and causal only."""
        scale = 1.0
        for step in self.steps:
            if step[0] == "mul_const":
                scale *= step[1]
            elif step[0] == "div_const":
                scale /= step[1]
            elif step[0] != "causal":
                return None
        return scale

    def apply(self, s: Array, sides: Sequence[Array], q_pos: Array, k_pos: Array) -> Array:
        """Logits of one block: `s` is `[rows, cols]` float32; sides are the matching blocks."""
        x = s
        for step in self.steps:
            kind = step[0]
            if kind == "mul_const":
                x = x * jnp.float32(step[1])
            elif kind == "div_const":
                x = x / jnp.float32(step[1])
            elif kind in _SIDE_ARITH:
                side = sides[step[1]].astype(jnp.float32)
                x = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
                     "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
                     "rsub": lambda a, b: b - a, "rdiv": lambda a, b: b / a}[kind](x, side)
            elif kind == "where":
                keep = sides[step[1]].astype(bool)
                keep = keep if step[3] else jnp.logical_not(keep)
                x = jnp.where(keep, x, jnp.float32(step[2]))
            elif kind == "causal":
                keep = k_pos[None, :] <= q_pos[:, None]
                x = jnp.where(keep, x, jnp.float32(step[1]))
            elif kind == "cast":
                x = x.astype(step[1]).astype(jnp.float32)
            else:
                raise ValueError(f"LogitsTransform: unknown step kind {kind!r}")
        return x


@dataclass(frozen=True)
class _Config:
    transform: LogitsTransform
    block_q: int
    block_k: int
    out_dtype: str | None
    bwd_block_q: int = 0
    bwd_block_k: int = 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_side(side: Array, rows: int, cols: int) -> Array:
    if side.shape[0] != 1:
        side = _pad_axis(side, 0, rows)
    if side.shape[1] != 1:
        side = _pad_axis(side, 1, cols)
    return side


def _side_block(side: Array, i: Array, j: Array, br: int, bc: int) -> Array:
    start_r = i * br if side.shape[0] != 1 else 0
    start_c = j * bc if side.shape[1] != 1 else 0
    size_r = br if side.shape[0] != 1 else 1
    size_c = bc if side.shape[1] != 1 else 1
    return lax.dynamic_slice(side, (start_r, start_c), (size_r, size_c))


def _dot_t(a: Array, b: Array) -> Array:
    """a · bᵀ in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _blocks(cfg: _Config, nq: int, nk: int, backward: bool = False
            ) -> tuple[int, int, int, int]:
    bq, bk = cfg.block_q, cfg.block_k
    if backward and cfg.bwd_block_q > 0 and cfg.bwd_block_k > 0:
        bq, bk = cfg.bwd_block_q, cfg.bwd_block_k
    br = max(1, min(bq, nq))
    bc = max(1, min(bk, nk))
    return br, bc, _cdiv(nq, br), _cdiv(nk, bc)


def _forward(cfg: _Config, q: Array, k: Array, v: Array, sides: tuple[Array, ...]
             ) -> tuple[Array, Array]:
    """(O [Nq, dv], lse [Nq]) of one head."""
    nq, d = q.shape
    nk, dv = v.shape
    br, bc, tq, tk = _blocks(cfg, nq, nk)
    qp = _pad_axis(q.astype(jnp.float32), 0, tq * br)
    kp = _pad_axis(k.astype(jnp.float32), 0, tk * bc)
    vp = _pad_axis(v.astype(jnp.float32), 0, tk * bc)
    sides_p = tuple(_pad_side(s, tq * br, tk * bc) for s in sides)
    transform = cfg.transform
    skip = transform.skips_causal_blocks

    def q_block(i: Array) -> tuple[Array, Array]:
        q_i = lax.dynamic_slice_in_dim(qp, i * br, br)
        q_pos = i * br + jnp.arange(br)

        def kv_step(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            o, l_sum, m = carry
            k_j = lax.dynamic_slice_in_dim(kp, j * bc, bc)
            v_j = lax.dynamic_slice_in_dim(vp, j * bc, bc)
            k_pos = j * bc + jnp.arange(bc)
            blocks = [_side_block(s, i, j, br, bc) for s in sides_p]
            logits = transform.apply(_dot_t(q_i, k_j), blocks, q_pos, k_pos)
            logits = jnp.where(k_pos[None, :] < nk, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(logits - m_safe[:, None])
            alpha = jnp.exp(m - m_safe)
            l_new = alpha * l_sum + jnp.sum(p, axis=1)
            o_new = alpha[:, None] * o + jnp.dot(p, v_j, preferred_element_type=jnp.float32)
            return o_new, l_new, m_new

        init = (jnp.zeros((br, dv), jnp.float32), jnp.zeros((br,), jnp.float32),
                jnp.full((br,), -jnp.inf, jnp.float32))
        upper: Any = tk
        if skip:
            upper = jnp.minimum(tk, ((i + 1) * br - 1) // bc + 1)
        o, l_sum, m = lax.fori_loop(0, upper, kv_step, init)
        m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
        return o / l_sum[:, None], m_safe + jnp.log(l_sum)

    o_blocks, lse_blocks = lax.map(q_block, jnp.arange(tq))
    o = o_blocks.reshape(tq * br, dv)[:nq]
    lse = lse_blocks.reshape(tq * br)[:nq]
    return o.astype(cfg.out_dtype or v.dtype), lse


def _backward(cfg: _Config, q: Array, k: Array, v: Array, sides: tuple[Array, ...], o: Array,
              lse: Array, do: Array) -> tuple[Array, Array, Array, tuple[Array, ...]]:
    """(dQ, dK, dV, dsides) of one head, recomputing P blockwise."""
    nq, d = q.shape
    nk, dv = v.shape
    br, bc, tq, tk = _blocks(cfg, nq, nk, backward=True)
    do32 = do.astype(jnp.float32)
    delta = jnp.sum(do32 * o.astype(jnp.float32), axis=1)
    qp = _pad_axis(q.astype(jnp.float32), 0, tq * br)
    dop = _pad_axis(do32, 0, tq * br)
    lsep = _pad_axis(lse, 0, tq * br)
    deltap = _pad_axis(delta, 0, tq * br)
    kp = _pad_axis(k.astype(jnp.float32), 0, tk * bc)
    vp = _pad_axis(v.astype(jnp.float32), 0, tk * bc)
    sides_p = tuple(_pad_side(s, tq * br, tk * bc) for s in sides)
    float_ids = [n for n, s in enumerate(sides) if jnp.issubdtype(s.dtype, jnp.floating)]
    transform = cfg.transform
    skip = transform.skips_causal_blocks

    def kv_block(carry: tuple[Array, tuple[Array, ...]], j: Array
                 ) -> tuple[tuple[Array, tuple[Array, ...]], tuple[Array, Array]]:
        k_j = lax.dynamic_slice_in_dim(kp, j * bc, bc)
        v_j = lax.dynamic_slice_in_dim(vp, j * bc, bc)
        k_pos = j * bc + jnp.arange(bc)
        k_ok = k_pos < nk

        def q_step(i: Array, c: tuple[Array, Array, Array, tuple[Array, ...]]
                   ) -> tuple[Array, Array, Array, tuple[Array, ...]]:
            dk_j, dv_j, dq, dsides = c
            q_i = lax.dynamic_slice_in_dim(qp, i * br, br)
            do_i = lax.dynamic_slice_in_dim(dop, i * br, br)
            lse_i = lax.dynamic_slice_in_dim(lsep, i * br, br)
            delta_i = lax.dynamic_slice_in_dim(deltap, i * br, br)
            q_pos = i * br + jnp.arange(br)
            blocks = [_side_block(s, i, j, br, bc) for s in sides_p]

            def logits_of(s: Array, *float_blocks: Array) -> Array:
                full = list(blocks)
                for n, blk in zip(float_ids, float_blocks, strict=True):
                    full[n] = blk
                return transform.apply(s, full, q_pos, k_pos)

            logits, vjp_fn = jax.vjp(logits_of, _dot_t(q_i, k_j),
                                     *[blocks[n] for n in float_ids])
            valid = (q_pos[:, None] < nq) & k_ok[None, :]
            p = jnp.where(valid, jnp.exp(logits - lse_i[:, None]), 0.0)
            dv_j = dv_j + jnp.dot(p.T, do_i, preferred_element_type=jnp.float32)
            dp = _dot_t(do_i, v_j)
            dlogits = jnp.where(valid, p * (dp - delta_i[:, None]), 0.0)
            ds, *dblocks = vjp_fn(dlogits)
            dq_i = lax.dynamic_slice_in_dim(dq, i * br, br) + jnp.dot(
                ds, k_j, preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_i, i * br, 0)
            dk_j = dk_j + jnp.dot(ds.T, q_i, preferred_element_type=jnp.float32)
            new_dsides = []
            for acc, n, dblk in zip(dsides, float_ids, dblocks, strict=True):
                side = sides_p[n]
                start = (i * br if side.shape[0] != 1 else 0, j * bc if side.shape[1] != 1 else 0)
                old = lax.dynamic_slice(acc, start, dblk.shape)
                new_dsides.append(lax.dynamic_update_slice(acc, old + dblk, start))
            return dk_j, dv_j, dq, tuple(new_dsides)

        dq, dsides = carry
        init = (jnp.zeros((bc, d), jnp.float32), jnp.zeros((bc, dv), jnp.float32), dq, dsides)
        lower: Any = 0
        if skip:
            lower = (j * bc) // br
        dk_j, dv_j, dq, dsides = lax.fori_loop(lower, tq, q_step, init)
        return (dq, dsides), (dk_j, dv_j)

    dsides0 = tuple(jnp.zeros(sides_p[n].shape, jnp.float32) for n in float_ids)
    (dq, dsides_f), (dk_b, dv_b) = lax.scan(
        kv_block, (jnp.zeros((tq * br, d), jnp.float32), dsides0), jnp.arange(tk))
    dq = dq[:nq].astype(q.dtype)
    dk = dk_b.reshape(tk * bc, d)[:nk].astype(k.dtype)
    dvv = dv_b.reshape(tk * bc, dv)[:nk].astype(v.dtype)
    dsides_out: list[Any] = []
    by_id = dict(zip(float_ids, dsides_f, strict=True))
    for n, side in enumerate(sides):
        if n in by_id:
            dsides_out.append(by_id[n][: side.shape[0], : side.shape[1]].astype(side.dtype))
        else:
            dsides_out.append(np.zeros(side.shape, dtype=jax.dtypes.float0))
    return dq, dk, dvv, tuple(dsides_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_head(cfg: _Config, q: Array, k: Array, v: Array, sides: tuple[Array, ...]
                    ) -> Array:
    return _forward(cfg, q, k, v, sides)[0]


def _attention_head_fwd(cfg: _Config, q: Array, k: Array, v: Array, sides: tuple[Array, ...]
                        ) -> tuple[Array, tuple[Any, ...]]:
    o, lse = _forward(cfg, q, k, v, sides)
    return o, (q, k, v, sides, o, lse)


def _attention_head_bwd(cfg: _Config, res: tuple[Any, ...], do: Array
                        ) -> tuple[Array, Array, Array, tuple[Array, ...]]:
    q, k, v, sides, o, lse = res
    return _backward(cfg, q, k, v, sides, o, lse, do)


_attention_head.defvjp(_attention_head_fwd, _attention_head_bwd)


def _vmap_leading(fn: Any, arrays: list[Array], num_batch: int) -> Array:
    """Apply `fn` over `num_batch` leading dims; a dim of size 1 broadcasts (in_axes None)."""
    if num_batch == 0:
        return fn(*arrays)
    sizes = {a.shape[0] for a in arrays if a.shape[0] != 1}
    if len(sizes) > 1:
        raise ValueError(f"batch dims do not broadcast: {sorted(sizes)}")
    if not sizes:
        squeezed = [a[0] for a in arrays]
        return _vmap_leading(fn, squeezed, num_batch - 1)[None]
    axes = [0 if a.shape[0] != 1 else None for a in arrays]
    args = [a if ax == 0 else a[0] for a, ax in zip(arrays, axes, strict=True)]

    def inner(*xs: Array) -> Array:
        return _vmap_leading(fn, list(xs), num_batch - 1)

    return jax.vmap(inner, in_axes=tuple(axes))(*args)


def blocked_attention(q: Array, k: Array, v: Array, sides: Sequence[Array] = (), *,
                      transform: LogitsTransform = LogitsTransform(), block_q: int = 128,
                      block_k: int = 128, out_dtype: Any = None,
                      backward_blocks: tuple[int, int] | None = None) -> Array:
    """Blocked attention with online softmax and a recomputing backward.

    Args:
        q: `[*batch, Nq, d]`; k: `[*batch, Nk, d]`; v: `[*batch, Nk, dv]`. Every batch dim is
            either the full size or 1 (broadcast), in each array independently.
        sides: arrays `[*batch, Nq | 1, Nk | 1]` the transform's steps refer to by index.
        transform: the elementwise map from raw scores `q·kᵀ` to logits.
        block_q: query rows per block (Br); block_k: key/value rows per block (Bc).
        out_dtype: dtype of the result (default: v's dtype).
        backward_blocks: (Br, Bc) of the backward (default: the forward's).

    Returns:
        `[*batch, Nq, dv]`: `softmax(transform(q kᵀ)) v` along the last axis of the scores.
    """
    num_batch = q.ndim - 2
    arrays = [q, k, v, *sides]
    for a in arrays:
        if a.ndim != num_batch + 2:
            raise ValueError(f"blocked_attention: expected rank {num_batch + 2}, got {a.shape}")
    bwd_q, bwd_k = backward_blocks if backward_blocks is not None else (0, 0)
    cfg = _Config(transform, int(block_q), int(block_k),
                  None if out_dtype is None else jnp.dtype(out_dtype).name,
                  int(bwd_q), int(bwd_k))

    def head(qh: Array, kh: Array, vh: Array, *sh: Array) -> Array:
        return _attention_head(cfg, qh, kh, vh, tuple(sh))

    return _vmap_leading(head, arrays, num_batch)


def _as_side(x: Array | None, batch_shape: tuple[int, ...]) -> Array | None:
    if x is None:
        return None
    num_batch = len(batch_shape)
    x = jnp.asarray(x)
    while x.ndim < num_batch + 2:
        x = x[None]
    return x


def flash_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                    bias: Array | None = None, causal: bool = False, scale: float | None = None,
                    block_q: int = 128, block_k: int = 128) -> Array:
    """`softmax(scale·q kᵀ + bias, masked) v` by blocked attention (layout `[..., N, d]`).

    `mask` (True = keep) and `bias` broadcast to `[..., Nq, Nk]`. Masked logits take the finite
    value jax.nn.dot_product_attention uses (so a fully masked row averages V, as there).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch_shape = q.shape[:-2]
    fill = -0.7 * float(np.finfo(np.float32).max)
    transform = LogitsTransform.standard(scale, causal, bias is not None, mask is not None, fill)
    sides = [s for s in (_as_side(bias, batch_shape), _as_side(mask, batch_shape))
             if s is not None]
    return blocked_attention(q, k, v, sides, transform=transform, block_q=block_q,
                             block_k=block_k)


def attention_reference(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                        bias: Array | None = None, causal: bool = False,
                        scale: float | None = None) -> Array:
    """The same computation as `flash_attention`, materialising the score matrix."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = jnp.einsum("...qd,...kd->...qk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    fill = -0.7 * float(np.finfo(np.float32).max)
    if mask is not None:
        s = jnp.where(mask, s, fill)
    if causal:
        nq, nk = s.shape[-2:]
        s = jnp.where(jnp.tril(jnp.ones((nq, nk), bool)), s, fill)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("...qk,...kd->...qd", p, v.astype(jnp.float32)).astype(v.dtype)

"""JAX's Pallas flash-attention kernels behind the layout `[*batch, N, d]` the apply step uses.

Each wrapper returns `(output, why)`, or `(None, why)` when the kernel does not accept the
pattern, so the caller falls back to the blocked JAX kernel:

- GPU (`jax.experimental.pallas.ops.gpu.attention.mha`, Triton): only a constant scale and a
  causal mask (no bias, no other mask), equal head dims of Q/K and V, and lengths divisible by
  power-of-two blocks of at least 16 (Triton block shapes are powers of two); the plan's blocks
  are rounded down to such a divisor. `interpret=True` runs it on any backend (slowly).
- TPU (`jax.experimental.pallas.ops.tpu.flash_attention`, Mosaic): same pattern restrictions,
  lengths divisible by the blocks, blocks multiples of 128 as Mosaic tiles require.
  `interpret=True` runs it through Pallas's TPU interpreter on any backend.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from tiermap.kernels.blocked_attention import LogitsTransform


def _pow2_block(n: int, wanted: int, smallest: int = 16) -> int | None:
    """The largest power of two ≤ wanted (and ≥ smallest) that divides n."""
    b = 1 << max(0, int(wanted).bit_length() - 1)
    while b >= smallest:
        if n % b == 0:
            return b
        b //= 2
    return None


def _scale_causal(transform: LogitsTransform, sides: list[Any]) -> tuple[float, bool] | str:
    if sides:
        return "bias or mask inputs"
    scale = transform.scale
    if scale is None:
        return "logits steps other than a constant scale and a causal mask"
    return scale, transform.causal


def _heads(q: Any, v: Any, transform: LogitsTransform, sides: list[Any]
           ) -> tuple[float, bool, int, int, int] | str:
    """(scale, causal, query length, key length, head dim) for the Pallas kernels, or why
    they cannot take this attention."""
    sc = _scale_causal(transform, sides)
    if isinstance(sc, str):
        return sc
    nq, d = q.shape[-2:]
    nk, dv = v.shape[-2:]
    if d != dv:
        return f"head dims differ (d={d}, dv={dv})"
    return sc[0], sc[1], nq, nk, dv


def _flatten(q: Any, k: Any, v: Any) -> tuple[Any, Any, Any, tuple[int, ...]]:
    batch = tuple(max(a, b, c) for a, b, c in zip(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                                  strict=True))
    q = jnp.broadcast_to(q, (*batch, *q.shape[-2:]))
    k = jnp.broadcast_to(k, (*batch, *k.shape[-2:]))
    v = jnp.broadcast_to(v, (*batch, *v.shape[-2:]))
    flat = math.prod(batch)
    return (q.reshape(flat, *q.shape[-2:]), k.reshape(flat, *k.shape[-2:]),
            v.reshape(flat, *v.shape[-2:]), batch)


def gpu_attention(q: Any, k: Any, v: Any, sides: list[Any], transform: LogitsTransform,
                  block_q: int, block_k: int, backward_blocks: tuple[int, int],
                  interpret: bool = False) -> tuple[Any | None, str]:
    """Pallas GPU `mha` with the plan's blocks (rounded to power-of-two divisors)."""
    heads = _heads(q, v, transform, sides)
    if isinstance(heads, str):
        return None, heads
    scale, causal, nq, nk, dv = heads
    bq, bk = _pow2_block(nq, block_q), _pow2_block(nk, block_k)
    bbq, bbk = _pow2_block(nq, backward_blocks[0]), _pow2_block(nk, backward_blocks[1])
    if bq is None or bk is None or bbq is None or bbk is None:
        return None, f"lengths {nq}, {nk} have no power-of-two block divisor of at least 16"
    from jax.experimental.pallas.ops.gpu import attention as gpu

    qf, kf, vf, batch = _flatten(q, k, v)
    sizes = gpu.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bbq, block_kv_dkv=bbk,
                           block_q_dq=bbq, block_kv_dq=bbk)
    out = gpu.mha(qf[:, :, None, :], kf[:, :, None, :], vf[:, :, None, :], None,
                  sm_scale=scale, causal=causal, block_sizes=sizes, interpret=interpret)
    out = out[:, :, 0, :].reshape(*batch, nq, dv)
    return out, f"blocks {bq}x{bk}, backward {bbq}x{bbk}" + (", interpret" if interpret else "")


def tpu_attention(q: Any, k: Any, v: Any, sides: list[Any], transform: LogitsTransform,
                  block_q: int, block_k: int, interpret: bool = False
                  ) -> tuple[Any | None, str]:
    """Pallas TPU `flash_attention` with the plan's blocks (rounded to multiples of 128).

    `interpret=True` runs it through Pallas's TPU interpreter on any backend (forward and
    backward both traced under `force_tpu_interpret_mode`)."""
    heads = _heads(q, v, transform, sides)
    if isinstance(heads, str):
        return None, heads
    scale, causal, nq, nk, dv = heads
    bq = _pow2_block(nq, max(block_q, 128), smallest=128)
    bk = _pow2_block(nk, max(block_k, 128), smallest=128)
    if bq is None or bk is None:
        return None, f"lengths {nq}, {nk} are not multiples of a 128-row block"
    if jax.default_backend() != "tpu" and not interpret:
        return None, "the Mosaic TPU kernel runs only on TPU (or with interpret=True)"
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu

    qf, kf, vf, batch = _flatten(q, k, v)
    sizes = tpu.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                           block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                           block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)

    def kernel(qq: Any, kk: Any, vv: Any) -> Any:
        return tpu.flash_attention(qq, kk, vv, causal=causal, sm_scale=scale,
                                   block_sizes=sizes)

    if not interpret:
        out = kernel(qf[:, None], kf[:, None], vf[:, None])
    else:
        @jax.custom_vjp
        def run(qq: Any, kk: Any, vv: Any) -> Any:
            with pltpu.force_tpu_interpret_mode():
                return kernel(qq, kk, vv)

        def run_fwd(qq: Any, kk: Any, vv: Any) -> tuple[Any, Any]:
            with pltpu.force_tpu_interpret_mode():
                return jax.vjp(kernel, qq, kk, vv)

        def run_bwd(vjp_fn: Any, g: Any) -> Any:
            with pltpu.force_tpu_interpret_mode():
                return vjp_fn(g)

        run.defvjp(run_fwd, run_bwd)
        out = run(qf[:, None], kf[:, None], vf[:, None])
    return (out[:, 0].reshape(*batch, nq, dv),
            f"blocks {bq}x{bk}" + (", interpret" if interpret else ""))

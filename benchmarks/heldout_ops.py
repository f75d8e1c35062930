"""The held-out operator suite for the cost model's fidelity check (set aside before tuning).

`tiermap calibrate` measures only these kernels (tiermap/costmodel/calibration_sweeps.py): the
full sum of a 1-D f32 array, a fill (broadcast of a scalar), `x + 1` (a copy), `exp`, `tanh`,
`erf` and `log` of a 1-D array, a fused chain of multiply-adds on a 1-D array, square n x n
matmuls per dtype, and a chain of tiny unfusable ops (per-op overhead).

Nothing here is any of those: non-square and batched matmuls, matrix-vector products, softmax,
layer norm, exact and tanh-approximated GELU, reductions over rows and columns and a max
reduction on 2-D arrays, mixed elementwise chains of several inputs, a transpose-add,
convolutions and attention, at sizes from cache-resident to DRAM-sized. This file was written and
committed before the calibrated model was tuned; the model has no per-op factors for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
BF16 = jnp.bfloat16


@dataclass(frozen=True)
class Case:
    """One held-out operator instance: a function and the shapes of its arguments."""

    op: str
    shape: str
    fn: Callable[..., Any]
    args: tuple[jax.ShapeDtypeStruct, ...]


def _sds(*shape: int, dtype: Any = F32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return a @ b


def _softmax(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(x, axis=-1)


def _layernorm(x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _fma3(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    return a * b + c


def _tanh_mul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.tanh(a) * b


def _transpose_add(a: jax.Array, b: jax.Array) -> jax.Array:
    return a.T + b


def _sum_rows(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=1)


def _sum_cols(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=0)


def _max_rows(x: jax.Array) -> jax.Array:
    return jnp.max(x, axis=-1)


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    s = jnp.einsum("hqd,hkd->hqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
    return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(s, axis=-1), v)


def heldout_suite() -> list[Case]:
    """The held-out suite: 24 cases, none of them a kernel the calibration measures."""
    mm = [(384, 1536, 96), (4096, 512, 64), (96, 2048, 768)]
    cases = [Case("matmul", f"{m}x{k}x{n}", _matmul, (_sds(m, k), _sds(k, n)))
             for m, k, n in mm]
    cases += [
        Case("batched matmul", "16x256x64x256", _matmul,
             (_sds(16, 256, 64), _sds(16, 64, 256))),
        Case("matmul bf16", "256x1024x512", _matmul,
             (_sds(256, 1024, dtype=BF16), _sds(1024, 512, dtype=BF16))),
        Case("matvec", "4096x2048", _matmul, (_sds(4096, 2048), _sds(2048))),
        Case("softmax", "256x1024", _softmax, (_sds(256, 1024),)),
        Case("softmax", "2048x2048", _softmax, (_sds(2048, 2048),)),
        Case("layernorm", "1024x768", _layernorm, (_sds(1024, 768),)),
        Case("layernorm", "4096x1024", _layernorm, (_sds(4096, 1024),)),
        Case("gelu (erf)", "1024x1024", _gelu_exact, (_sds(1024, 1024),)),
        Case("gelu (tanh)", "512x2048", _gelu_tanh, (_sds(512, 2048),)),
        Case("a*b+c", "256x256", _fma3, (_sds(256, 256),) * 3),
        Case("a*b+c", "1536x1536", _fma3, (_sds(1536, 1536),) * 3),
        Case("tanh(a)*b", "4096x2048", _tanh_mul, (_sds(4096, 2048),) * 2),
        Case("transpose+add", "1024x1024", _transpose_add, (_sds(1024, 1024),) * 2),
        Case("sum rows", "2048x4096", _sum_rows, (_sds(2048, 4096),)),
        Case("sum cols", "1024x1024", _sum_cols, (_sds(1024, 1024),)),
        Case("max rows", "512x512", _max_rows, (_sds(512, 512),)),
        Case("conv3x3", "1x32x32x64->64", _conv, (_sds(1, 32, 32, 64), _sds(3, 3, 64, 64))),
        Case("conv3x3", "4x28x28x64->128", _conv, (_sds(4, 28, 28, 64), _sds(3, 3, 64, 128))),
        Case("attention", "4x256x64", _attention, (_sds(4, 256, 64),) * 3),
        Case("attention", "8x512x64", _attention, (_sds(8, 512, 64),) * 3),
        Case("attention", "2x1024x128", _attention, (_sds(2, 1024, 128),) * 3),
    ]
    return cases

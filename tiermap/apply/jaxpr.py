"""jaxpr plumbing shared by the matcher and the rewriter: binding equations, inlining calls to
`jit`-wrapped functions, liveness, and the shape and dtype of a jaxpr var."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

INLINE_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})


def bind_eqn(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def is_literal(v: Any) -> bool:
    return isinstance(v, jcore.Literal)


def bind_env(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> dict[Any, Any]:
    """A jaxpr's environment with its constants and arguments bound."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    return env


def _eval_inlined(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env = bind_env(jaxpr, consts, args)

    def read(v: Any) -> Any:
        return v.val if is_literal(v) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name in INLINE_PRIMITIVES:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if isinstance(inner, jcore.ClosedJaxpr):
                outs = _eval_inlined(inner.jaxpr, inner.consts, invals)
            else:
                outs = _eval_inlined(inner, (), invals)
        else:
            outs = bind_eqn(eqn, invals)
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate `jaxpr` equation by equation under the current trace, calls inlined."""
    return _eval_inlined(jaxpr, consts, args)


def inline_calls(closed: Any) -> Any:
    """The same program with calls to jit-wrapped functions inlined (a ClosedJaxpr)."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _eval_inlined(closed.jaxpr, closed.consts, a))(*avals)


def live_eqns(jaxpr: Any) -> list[bool]:
    """Per equation: whether some output is used (or it has effects)."""
    live: set[Any] = {v for v in jaxpr.outvars if not is_literal(v)}
    keep = [False] * len(jaxpr.eqns)
    for idx in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[idx]
        if eqn.effects or any(v in live for v in eqn.outvars):
            keep[idx] = True
            live.update(v for v in eqn.invars if not is_literal(v))
    return keep


def var_dtype(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.dtype
    return v.aval.dtype


def var_shape(v: Any) -> tuple[int, ...]:
    if is_literal(v):
        return tuple(np.shape(v.val))
    return tuple(v.aval.shape)

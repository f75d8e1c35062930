"""Run a planned program through JAX: tiled attention kernels and host-tier inputs.

`apply_plan(fn, plan)` returns a function that computes what `fn` computes, with

- every attention it recognises replaced by a tiled kernel with the plan's block sizes: JAX's
  Pallas flash attention on GPU (`jax.experimental.pallas.ops.gpu.attention.mha`) and TPU
  (`jax.experimental.pallas.ops.tpu.flash_attention`) where those kernels accept the pattern
  (scale and causal mask only, equal head dims, lengths divisible by the blocks), and the blocked
  JAX kernel of `tiermap/kernels/blocked_attention.py` everywhere else (online softmax, a
  recomputing `custom_vjp` backward, masks and biases sliced per block);
- program inputs that the plan keeps in a host tier placed in host memory
  (`memory_kind="pinned_host"`) where the device has that memory, and moved to device memory
  inside the program;
- everything else run as `jax.jit` runs it.

Mechanism: `fn` is traced to a jaxpr; calls to `jit`-wrapped functions are inlined; each
`dot_general` is tried as the first product of an attention: the equations that read its result
are interpreted abstractly (scale, bias, masks, the softmax of `jax.nn.softmax`, flax and
hand-written code, and the second product with V), every tensor dim carrying a label (batch,
query, key, head) so that any layout maps onto the kernel's `[..., N, d]`. A pattern is replaced
only when nothing outside it (or its backward, below) reads its intermediates; masks that do not
depend on the inputs are evaluated once at trace time and recognised as causal when they are.
`scan` bodies (flax `nn.scan`) are rewritten too. The k-th attention of the program gets the
block sizes of the plan's k-th attention group (`attn{k}`); patterns the plan does not cover
(inside scan bodies, or where shapes differ) get tiles searched for the plan's target on the
spot.

Differentiating the applied function uses the kernel's `custom_vjp` (a recomputing, tiled
backward). When `fn` itself differentiates (`jax.grad`, `jax.vjp` inside it), the backward JAX
wrote out is matched too — the equations that read the forward's probabilities and row
statistics, bounded by the transposes of the two products (dP = dO·Vᵀ, and the cotangents of Q,
K and V) — and replaced, with the forward, by `jax.vjp` of the kernel. Left to XLA (with a note
in `.notes`): attention whose probabilities are scaled by data (dropout), a backward that
differentiates a bias, and anything else outside these patterns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from tiermap.errors import TiermapError
from tiermap.kernels.blocked_attention import LogitsTransform, blocked_attention

if TYPE_CHECKING:
    from tiermap.ir.plan import Plan

INLINE_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call"})
IDENTITY_PRIMITIVES = frozenset({"stop_gradient", "copy", "copy_p", "optimization_barrier"})
KERNELS = ("auto", "blocked", "pallas-gpu", "pallas-tpu")


# --- jaxpr helpers ------------------------------------------------------------------------------


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _is_literal(v: Any) -> bool:
    return isinstance(v, jcore.Literal)


def _bind_env(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> dict[Any, Any]:
    """A jaxpr's environment with its constants and arguments bound."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    return env


def _eval_inlined(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env = _bind_env(jaxpr, consts, args)

    def read(v: Any) -> Any:
        return v.val if _is_literal(v) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name in INLINE_PRIMITIVES:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if isinstance(inner, jcore.ClosedJaxpr):
                outs = _eval_inlined(inner.jaxpr, inner.consts, invals)
            else:
                outs = _eval_inlined(inner, (), invals)
        else:
            outs = _bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def inline_calls(closed: Any) -> Any:
    """The same program with calls to jit-wrapped functions inlined (a ClosedJaxpr)."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _eval_inlined(closed.jaxpr, closed.consts, a))(*avals)


def _live_eqns(jaxpr: Any) -> list[bool]:
    """Per equation: whether some output is used (or it has effects)."""
    live: set[Any] = {v for v in jaxpr.outvars if not _is_literal(v)}
    keep = [False] * len(jaxpr.eqns)
    for idx in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[idx]
        if eqn.effects or any(v in live for v in eqn.outvars):
            keep[idx] = True
            live.update(v for v in eqn.invars if not _is_literal(v))
    return keep


# --- pattern ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AV:
    """Abstract value of a tensor derived from the scores: kind, dim labels, logits steps."""

    kind: str  # L (logits), RMAX, SHIFT, EXP, RSUM, RINV, P
    labels: tuple[int, ...]
    steps: tuple[tuple[Any, ...], ...] = ()


@dataclass
class _Side:
    """A side input of the logits (bias or mask): a jaxpr var or a concrete array, with the
    score label of each of its dims (None where it broadcasts)."""

    value: Any
    labels: tuple[int | None, ...]
    concrete: bool


@dataclass
class AttentionMatch:
    """One attention found in a jaxpr, with everything the kernel call needs.

    Attributes:
        d1, d2: indices of the two dot_general equations.
        region: indices of the equations the kernel replaces (D1 … D2).
        q, k, v: the jaxpr vars in the Q, K and V roles; *_labels: their dims' labels.
        sides: bias and mask inputs; steps: the logits transform (sides by index).
        label_role, label_size: per label: "b" batch, "q" query, "k" key, "d" head,
            "e" value head, "u" unit; and its size.
        out_labels: labels of D2's output dims.
        q_len, kv_len, head_dim, v_head_dim: sizes (q_len is every query dim together).
    """

    d1: int
    d2: int
    region: frozenset[int]
    q: Any
    k: Any
    v: Any
    q_labels: tuple[int, ...]
    k_labels: tuple[int, ...]
    v_labels: tuple[int, ...]
    sides: list[_Side]
    steps: tuple[tuple[Any, ...], ...]
    label_role: list[str]
    label_size: list[int]
    out_labels: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    q_len: int = 0
    kv_len: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    notes: list[str] = field(default_factory=list)
    bwd_region: frozenset[int] = frozenset()
    bwd_at: int = -1
    ct_in: Any = None
    ct_out: dict[Any, tuple[str, ...]] = field(default_factory=dict)


class _NoMatch(Exception):
    """Raised inside the matcher when a candidate is not an attention it can replace."""


class _Matcher:
    """Finds attention patterns in one (inlined) jaxpr."""

    def __init__(self, jaxpr: Any, consts: Sequence[Any]) -> None:
        self.jaxpr = jaxpr
        self.consts = {v: c for v, c in zip(jaxpr.constvars, consts, strict=True)}
        self.live = _live_eqns(jaxpr)
        self.producer: dict[Any, int] = {}
        self.users: dict[Any, list[int]] = {}
        dependent: set[Any] = set(jaxpr.invars)
        self.dependent = dependent
        for idx, eqn in enumerate(jaxpr.eqns):
            if not self.live[idx]:
                continue
            for v in eqn.outvars:
                self.producer[v] = idx
            for v in eqn.invars:
                if not _is_literal(v):
                    self.users.setdefault(v, []).append(idx)
            if any((not _is_literal(v)) and v in dependent for v in eqn.invars) or eqn.effects:
                dependent.update(eqn.outvars)
        self._concrete: dict[Any, Any] = {}
        self.skipped: list[str] = []

    # --- concrete evaluation of input-independent values --------------------------------------

    def is_concrete(self, v: Any) -> bool:
        return _is_literal(v) or v not in self.dependent

    def concrete(self, v: Any) -> np.ndarray:
        """The value of an input-independent var, computed at trace time."""
        if _is_literal(v):
            return np.asarray(v.val)
        if v in self.consts:
            return np.asarray(self.consts[v])
        if v in self._concrete:
            return self._concrete[v]
        needed: set[int] = set()
        stack = [v]
        while stack:
            x = stack.pop()
            if _is_literal(x) or x in self.consts or x in self._concrete:
                continue
            idx = self.producer[x]
            if idx in needed:
                continue
            needed.add(idx)
            stack.extend(self.jaxpr.eqns[idx].invars)
        with jax.ensure_compile_time_eval():
            for idx in sorted(needed):
                eqn = self.jaxpr.eqns[idx]
                invals = [self.concrete(x) for x in eqn.invars]
                for ov, o in zip(eqn.outvars, _bind(eqn, invals), strict=True):
                    self._concrete[ov] = np.asarray(o)
        return self._concrete[v]

    # --- the search ---------------------------------------------------------------------------

    def find(self) -> list[AttentionMatch]:
        out: list[AttentionMatch] = []
        taken: set[int] = set()
        for idx, eqn in enumerate(self.jaxpr.eqns):
            if eqn.primitive.name != "dot_general" or idx in taken or not self.live[idx]:
                continue
            builder = _PatternBuilder(self, idx)
            try:
                m = builder.build()
            except _NoMatch as exc:
                if builder.saw_softmax and builder.noteworthy:
                    self.skipped.append(
                        f"an attention at equation {idx} was left to XLA: {exc}")
                continue
            if m.region & taken:
                continue
            taken |= m.region
            out.append(m)
        return out


class _PatternBuilder:
    """Abstract interpretation of the equations after one candidate D1."""

    def __init__(self, matcher: _Matcher, d1: int) -> None:
        self.m = matcher
        self.d1 = d1
        self.role: list[str] = []
        self.size: list[int] = []
        self.sides: list[_Side] = []
        self.kv_side: str | None = None  # "x" (lhs free dims) or "y" (rhs free dims)
        self.saw_softmax = False  # an exp of the logits was seen
        self.noteworthy = False  # an attention for sure (second product or dropout seen)

    def new(self, role: str, size: int) -> int:
        self.role.append("u" if size == 1 else role)
        self.size.append(size)
        return len(self.role) - 1

    def fail(self, why: str) -> None:
        raise _NoMatch(why)

    # --- label arithmetic -------------------------------------------------------------------

    def kv_labels(self) -> set[int]:
        return {i for i, r in enumerate(self.role) if r == self.kv_side}

    def reshape_labels(self, labels: tuple[int, ...], in_shape: Sequence[int],
                       out_shape: Sequence[int]) -> tuple[int, ...]:
        real = [lab for lab, s in zip(labels, in_shape, strict=True) if s != 1]
        out: list[int] = []
        it = iter(real)
        for s in out_shape:
            if s == 1:
                out.append(self.new("u", 1))
                continue
            lab = next(it, None)
            if lab is None or self.size[lab] != s:
                self.fail("reshape merges or splits dims")
            assert lab is not None
            out.append(lab)
        if next(it, None) is not None:
            self.fail("reshape drops a dim")
        return tuple(out)

    # --- side inputs ------------------------------------------------------------------------

    def side_leaves(self, v: Any, labels: tuple[int | None, ...], mask: bool
                    ) -> list[tuple[_Side | None, bool]]:
        """Leaves of a side value: (side or None for all-keep, keep_on_true)."""
        m = self.m
        keep = True
        while not _is_literal(v) and v in m.producer:
            eqn = m.jaxpr.eqns[m.producer[v]]
            name = eqn.primitive.name
            src = eqn.invars[0] if eqn.invars else None
            if name == "broadcast_in_dim" and src is not None:
                bd = eqn.params["broadcast_dimensions"]
                shp = _shape(src)
                labels = tuple(labels[bd[i]] if shp[i] != 1 else None for i in range(len(shp)))
            elif name == "reshape" and src is not None:
                if [s for s in _shape(src) if s != 1] != [s for s in _shape(v) if s != 1]:
                    break
                real = iter([lab for lab, s in zip(labels, _shape(v), strict=True) if s != 1])
                labels = tuple(next(real) if s != 1 else None for s in _shape(src))
            elif name == "transpose" and src is not None:
                perm = eqn.params["permutation"]
                inv = [0] * len(perm)
                for i, p in enumerate(perm):
                    inv[p] = i
                labels = tuple(labels[inv[i]] for i in range(len(perm)))
            elif name == "squeeze" and src is not None:
                dims = set(eqn.params["dimensions"])
                real = iter(labels)
                labels = tuple(None if i in dims else next(real) for i in range(len(_shape(src))))
            elif name == "convert_element_type" and src is not None and not mask:
                pass
            elif name == "and" and mask and len(eqn.invars) == 2:
                if keep is False:
                    break
                out: list[tuple[_Side | None, bool]] = []
                for x in eqn.invars:
                    out.extend(self.side_leaves(x, labels, mask))
                return out
            elif name == "not" and mask and src is not None:
                keep = not keep
            else:
                break
            v = src
        if m.is_concrete(v):
            arr = m.concrete(v)
            arr = np.asarray(arr)
            if arr.ndim != len(labels):
                arr = arr.reshape(tuple(1 for _ in labels)) if arr.size == 1 else arr
            if arr.ndim != len(labels):
                self.fail("side input rank")
            for ax in range(arr.ndim):
                if arr.shape[ax] > 1 and np.all(arr == arr.take([0], axis=ax)):
                    arr = arr.take([0], axis=ax)
            labs = tuple(lab if arr.shape[i] > 1 else None for i, lab in enumerate(labels))
            if mask and arr.dtype == bool and bool(np.all(arr == keep)):
                return [(None, True)]
            return [(_Side(arr, labs, True), keep)]
        shp = _shape(v)
        labs = tuple(lab if shp[i] > 1 else None for i, lab in enumerate(labels))
        return [(_Side(v, labs, False), keep)]

    def add_side(self, side: _Side) -> int:
        for lab in side.labels:
            if lab is not None and self.role[lab] in ("d", "e"):
                self.fail("side input spans a head dim")
        self.sides.append(side)
        return len(self.sides) - 1

    def scalar_const(self, v: Any) -> float | None:
        if not self.m.is_concrete(v):
            return None
        arr = np.asarray(self.m.concrete(v))
        if arr.size == 0:
            return None
        first = arr.reshape(-1)[0]
        if not np.all(arr == first):
            return None
        return float(first)

    # --- the walk ---------------------------------------------------------------------------

    def build(self) -> AttentionMatch:
        m = self.m
        eqns = m.jaxpr.eqns
        d1 = eqns[self.d1]
        (lc, rc), (lb, rb) = d1.params["dimension_numbers"]
        lhs, rhs = d1.invars
        ls, rs = _shape(lhs), _shape(rhs)
        lhs_lab: list[int] = [-1] * len(ls)
        rhs_lab: list[int] = [-1] * len(rs)
        batch = []
        for a, b in zip(lb, rb, strict=True):
            lab = self.new("b", ls[a])
            lhs_lab[a] = rhs_lab[b] = lab
            batch.append(lab)
        for a, b in zip(lc, rc, strict=True):
            lab = self.new("d", ls[a])
            lhs_lab[a] = rhs_lab[b] = lab
        lfree = [self.new("x", ls[i]) for i in range(len(ls)) if lhs_lab[i] < 0]
        it = iter(lfree)
        lhs_lab = [lab if lab >= 0 else next(it) for lab in lhs_lab]
        rfree = [self.new("y", rs[i]) for i in range(len(rs)) if rhs_lab[i] < 0]
        it = iter(rfree)
        rhs_lab = [lab if lab >= 0 else next(it) for lab in rhs_lab]
        avs: dict[Any, _AV] = {d1.outvars[0]: _AV("L", tuple(batch + lfree + rfree))}
        region = {self.d1}
        d2 = -1
        result: tuple[Any, tuple[int, ...], tuple[int, ...]] | None = None
        foreign: list[tuple[int, str]] = []
        for idx in range(self.d1 + 1, len(eqns)):
            if not m.live[idx]:
                continue
            eqn = eqns[idx]
            ins = [avs.get(v) if not _is_literal(v) else None for v in eqn.invars]
            if not any(a is not None for a in ins):
                continue
            if eqn.primitive.name == "dot_general":
                result = self.second_product(eqn, ins)
                d2 = idx
                region.add(idx)
                self.noteworthy = True
                break
            try:
                outs = self.step(eqn, ins)
            except _NoMatch as exc:
                # Not a step of the forward: a backward (jax.grad) op reading a statistic, or
                # something that breaks the pattern. Either the backward match takes it below
                # or the whole candidate fails.
                foreign.append((idx, str(exc)))
                if " of P " in str(exc):
                    self.noteworthy = True  # probabilities scaled by data: dropout
                continue
            region.add(idx)
            for v, av in zip(eqn.outvars, outs, strict=True):
                avs[v] = av
        if result is None:
            why = next((w for _i, w in foreign if " of P " in w),
                       foreign[0][1] if foreign else "")
            self.fail("no second product" + (f" ({why})" if why else ""))
        assert result is not None
        escapes = bool(foreign) or any(
            any(u not in region for u in m.users.get(v, [])) or v in m.jaxpr.outvars
            for v in avs)
        v_var, v_lab, out_lab = result
        if self.kv_side == "y":
            q, k, q_lab, k_lab = lhs, rhs, tuple(lhs_lab), tuple(rhs_lab)
        else:
            q, k, q_lab, k_lab = rhs, lhs, tuple(rhs_lab), tuple(lhs_lab)
        p_in = next(v for v in eqns[d2].invars if not _is_literal(v) and v in avs)
        steps = self.recognise_causal(avs[p_in].steps)
        out = eqns[d2].outvars[0]
        qlen = math.prod(self.size[i] for i in set(q_lab) if self.role[i] in ("x", "y", "q"))
        klen = math.prod(self.size[i] for i in set(k_lab) if self.role[i] == self.kv_side)
        dlen = math.prod(self.size[i] for i in set(q_lab) if self.role[i] == "d")
        for i, r in enumerate(self.role):
            if r in ("x", "y"):
                self.role[i] = "k" if r == self.kv_side else "q"
        elen = math.prod(self.size[i] for i in set(v_lab) if self.role[i] == "e")
        match = AttentionMatch(
            d1=self.d1, d2=d2, region=frozenset(region), q=q, k=k, v=v_var, q_labels=q_lab,
            k_labels=k_lab, v_labels=v_lab, sides=self.sides, steps=steps,
            label_role=self.role, label_size=self.size, out_labels=out_lab,
            out_shape=tuple(out.aval.shape), out_dtype=out.aval.dtype, q_len=qlen,
            kv_len=klen, head_dim=dlen, v_head_dim=elen)
        if escapes:
            if any(not s.concrete and jnp.issubdtype(_dtype(s.value), jnp.floating)
                   for s in self.sides):
                self.fail("an intermediate of the attention is read elsewhere (a backward "
                          "that differentiates a bias is left to XLA)")
            _BackwardBuilder(m, match, set(avs)).attach()
            missed = [f"{eqns[i].primitive.name}: {why}" for i, why in foreign
                      if i not in match.bwd_region]
            if missed:
                self.fail(missed[0])
        return match

    def elementwise_labels(self, eqn: Any, ins: list[_AV | None]) -> tuple[int, ...]:
        """Output labels of a broadcasting elementwise op: from the full-size abstract operand."""
        shape = _shape(eqn.outvars[0])
        for a, v in zip(ins, eqn.invars, strict=True):
            if a is not None and tuple(_shape(v)) == tuple(shape):
                return a.labels
        # every abstract operand broadcasts: fill unit positions from the others
        labels: list[int | None] = [None] * len(shape)
        for a, v in zip(ins, eqn.invars, strict=True):
            if a is None:
                continue
            for i, (lab, s) in enumerate(zip(a.labels, _shape(v), strict=True)):
                if s == shape[i] and labels[i] is None:
                    labels[i] = lab
        for i, maybe in enumerate(labels):
            if maybe is None:
                if self.kv_side is not None and any(
                        self.size[k] == shape[i] for k in self.kv_labels()):
                    labels[i] = next(k for k in self.kv_labels() if self.size[k] == shape[i])
                elif shape[i] == 1:
                    labels[i] = self.new("u", 1)
                else:
                    self.fail("cannot label a broadcast dim")
        return tuple(int(x) for x in labels if x is not None)

    def row_aligned(self, full: _AV, row: _AV, row_shape: Sequence[int]) -> bool:
        """A row statistic broadcasts along the key dims of `full` and matches elsewhere."""
        kv = self.kv_labels()
        for lab_f, lab_r, s in zip(full.labels, row.labels, row_shape, strict=True):
            if lab_f in kv:
                if s != 1:
                    return False
            elif s != 1 and lab_f != lab_r:
                return False
        return True

    def step(self, eqn: Any, ins: list[_AV | None]) -> list[_AV]:
        name = eqn.primitive.name
        a = next(x for x in ins if x is not None)
        v_in = eqn.invars[ins.index(a)]
        if name in IDENTITY_PRIMITIVES:
            return [a]
        if name == "convert_element_type":
            steps = a.steps
            dt = jnp.dtype(eqn.params["new_dtype"])
            if a.kind == "L" and jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4:
                steps = steps + (("cast", dt.name),)
            return [_AV(a.kind, a.labels, steps)]
        if name == "reshape":
            return [_AV(a.kind, self.reshape_labels(a.labels, _shape(v_in),
                                                    _shape(eqn.outvars[0])), a.steps)]
        if name == "squeeze":
            dims = set(eqn.params["dimensions"])
            return [_AV(a.kind, tuple(lab for i, lab in enumerate(a.labels) if i not in dims),
                        a.steps)]
        if name == "transpose":
            perm = eqn.params["permutation"]
            return [_AV(a.kind, tuple(a.labels[p] for p in perm), a.steps)]
        if name == "broadcast_in_dim":
            return [self.broadcast(eqn, a, v_in)]
        if name in ("reduce_max", "reduce_sum"):
            return [self.reduce(eqn, a)]
        if name == "exp" and a.kind in ("L", "SHIFT"):
            self.saw_softmax = True
            return [_AV("EXP", a.labels, a.steps)]
        if name == "integer_pow" and a.kind == "RSUM" and eqn.params.get("y") == -1:
            return [_AV("RINV", a.labels, a.steps)]
        if name in ("add", "add_any", "sub", "mul", "div", "max", "min"):
            return [self.binary(eqn, ins)]
        if name == "select_n":
            return [self.select(eqn, ins)]
        self.fail(f"{name} on the score path")
        raise AssertionError  # unreachable

    def broadcast(self, eqn: Any, a: _AV, v_in: Any) -> _AV:
        shape = eqn.params["shape"]
        bd = eqn.params["broadcast_dimensions"]
        in_shape = _shape(v_in)
        out: list[int] = []
        for o, s in enumerate(shape):
            if o in bd:
                src = list(bd).index(o)
                lab = a.labels[src]
                if in_shape[src] == 1 and s != 1:
                    lab = self.kv_label_of_size(s, a)
                out.append(lab)
            elif s == 1:
                out.append(self.new("u", 1))
            else:
                out.append(self.kv_label_of_size(s, a))
        return _AV(a.kind, tuple(out), a.steps)

    def kv_label_of_size(self, size: int, a: _AV) -> int:
        if a.kind not in ("RMAX", "RSUM", "RINV") or self.kv_side is None:
            self.fail("broadcast of a score-shaped value")
        for k in self.kv_labels():
            if self.size[k] == size:
                return k
        self.fail("broadcast to a size that is not the key length")
        raise AssertionError  # unreachable

    def reduce(self, eqn: Any, a: _AV) -> _AV:
        axes = set(eqn.params["axes"])
        labs = {a.labels[i] for i in axes if self.size[a.labels[i]] != 1}
        if not labs:
            self.fail("reduction over unit dims only")
        roles = {self.role[lab] for lab in labs}
        if len(roles) != 1 or roles.pop() not in ("x", "y"):
            self.fail("reduction over dims that are not one operand's free dims")
        side = self.role[next(iter(labs))]
        if self.kv_side is None:
            every = {i for i, r in enumerate(self.role) if r == side}
            if labs != every:
                self.fail("reduction over part of the key dims")
            self.kv_side = side
        elif labs != self.kv_labels():
            self.fail("reduction over other dims than the keys")
        kept = tuple(lab for i, lab in enumerate(a.labels) if i not in axes)
        if eqn.primitive.name == "reduce_max" and a.kind == "L":
            return _AV("RMAX", kept, a.steps)
        if eqn.primitive.name == "reduce_sum" and a.kind == "EXP":
            return _AV("RSUM", kept, a.steps)
        self.fail(f"{eqn.primitive.name} of {a.kind}")
        raise AssertionError  # unreachable

    def binary(self, eqn: Any, ins: list[_AV | None]) -> _AV:
        name = eqn.primitive.name
        x, y = ins
        vx, vy = eqn.invars
        if x is not None and y is not None:
            if name == "sub" and x.kind == "L" and y.kind == "RMAX":
                if x.steps != y.steps or not self.row_aligned(x, y, _shape(vy)):
                    self.fail("max of other logits")
                return _AV("SHIFT", x.labels, x.steps)
            if name == "div" and x.kind == "EXP" and y.kind == "RSUM":
                if not self.row_aligned(x, y, _shape(vy)):
                    self.fail("sum not aligned")
                return _AV("P", x.labels, x.steps)
            if name == "mul" and {x.kind, y.kind} == {"EXP", "RINV"}:
                e, r, vr = (x, y, vy) if x.kind == "EXP" else (y, x, vx)
                if not self.row_aligned(e, r, _shape(vr)):
                    self.fail("reciprocal not aligned")
                return _AV("P", e.labels, e.steps)
            self.fail(f"{name} of {x.kind} and {y.kind}")
        a = x if x is not None else y
        assert a is not None
        other = vy if x is not None else vx
        a_first = x is not None
        if a.kind == "RMAX" and name == "max":
            c = self.scalar_const(other)
            if c is not None and c == -math.inf:
                return a
            self.fail("max with a finite value")
        if a.kind == "RSUM" and name == "div" and not a_first:
            c = self.scalar_const(other)
            if c == 1.0:
                return _AV("RINV", a.labels, a.steps)
            self.fail("division into the row sum")
        if a.kind != "L":
            self.fail(f"{name} of {a.kind} with a side value")
        labels = self.elementwise_labels(eqn, [x, y])
        c = self.scalar_const(other)
        if c is not None and name in ("mul", "div") and (a_first or name == "mul"):
            return _AV("L", labels, a.steps + ((f"{name}_const", c),))
        kind = {"add": "add", "add_any": "add", "sub": "sub" if a_first else "rsub",
                "mul": "mul", "div": "div" if a_first else "rdiv"}.get(name)
        if kind is None:
            self.fail(f"{name} of logits")
        shp = _shape(other)
        if len(shp) != len(labels):
            self.fail("side rank")
        labs = tuple(lab if s != 1 else None for lab, s in zip(labels, shp, strict=True))
        leaves = self.side_leaves(other, labs, mask=False)
        side, _keep = leaves[0]
        if side is None or len(leaves) != 1:
            self.fail("side value")
        assert side is not None
        return _AV("L", labels, a.steps + ((kind, self.add_side(side)),))

    def select(self, eqn: Any, ins: list[_AV | None]) -> _AV:
        if len(eqn.invars) != 3 or ins[0] is not None:
            self.fail("select on the predicate")
        pred, c0, c1 = eqn.invars
        a0, a1 = ins[1], ins[2]
        if (a0 is None) == (a1 is None):
            self.fail("select of two score values")
        a = a0 if a0 is not None else a1
        assert a is not None
        if a.kind != "L":
            self.fail("select after the softmax started")
        fill_var = c1 if a0 is not None else c0
        keep_on_true = a1 is not None
        fill = self.scalar_const(fill_var)
        if fill is None:
            self.fail("mask fill is not a constant")
        labels = self.elementwise_labels(eqn, [None, a0, a1])
        shp = _shape(pred)
        labs = tuple(lab if s != 1 else None for lab, s in zip(labels, shp, strict=True)) if (
            len(shp) == len(labels)) else tuple(None for _ in labels)
        steps = list(a.steps)
        for side, keep in self.side_leaves(pred, labs, mask=True):
            if side is None:
                continue
            if not keep_on_true:
                keep = not keep
            steps.append(("where", self.add_side(side), fill, keep))
        return _AV("L", labels, tuple(steps))

    def recognise_causal(self, steps: tuple[tuple[Any, ...], ...]
                         ) -> tuple[tuple[Any, ...], ...]:
        """Turn masks that are concrete lower-triangular [q, k] arrays into causal steps and
        renumber the remaining sides (the keys are known once the softmax has been seen)."""
        out: list[tuple[Any, ...]] = []
        sides: list[_Side] = []
        renumber: dict[int, int] = {}
        for step in steps:
            if step[0] == "where":
                side = self.sides[step[1]]
                if side.concrete and step[3] and self.is_causal(side):
                    out.append(("causal", step[2]))
                    continue
            if step[0] == "where" or step[0] in ("add", "sub", "mul", "div", "rsub", "rdiv"):
                if step[1] not in renumber:
                    renumber[step[1]] = len(sides)
                    sides.append(self.sides[step[1]])
                out.append((step[0], renumber[step[1]], *step[2:]))
                continue
            out.append(step)
        self.sides = sides
        return tuple(out)

    def is_causal(self, side: _Side) -> bool:
        """A concrete [q, k] mask equal to tril (query i sees keys ≤ i)."""
        arr = np.asarray(side.value)
        dims = [(i, lab) for i, lab in enumerate(side.labels) if lab is not None]
        if len(dims) != 2 or arr.dtype != bool:
            return False
        (i0, l0), (i1, l1) = dims
        roles = {self.role[l0], self.role[l1]}
        if self.kv_side is None or roles != {"x", "y"}:
            return False
        if self.role[l0] == self.kv_side:
            (i0, l0), (i1, l1) = (i1, l1), (i0, l0)
        q_main = self.main_query_label()
        if l0 != q_main:
            return False
        mat = np.moveaxis(arr, (i0, i1), (-2, -1)).reshape(arr.shape[i0], arr.shape[i1])
        return bool(np.array_equal(mat, np.tril(np.ones(mat.shape, dtype=bool))))

    def main_query_label(self) -> int | None:
        qside = "y" if self.kv_side == "x" else "x"
        labs = [i for i, r in enumerate(self.role) if r in (qside, "q")]
        return max(labs, key=lambda i: (self.size[i], -i)) if labs else None

    def second_product(self, eqn: Any, ins: list[_AV | None]
                       ) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        a, b = ins
        if (a is None) == (b is None):
            self.fail("second product of two score values")
        p = a if a is not None else b
        assert p is not None
        if p.kind != "P":
            self.fail("product with un-normalised scores")
        p_first = a is not None
        v = eqn.invars[1] if p_first else eqn.invars[0]
        pc, vc = (lc, rc) if p_first else (rc, lc)
        pb, vb = (lb, rb) if p_first else (rb, lb)
        vshape = _shape(v)
        kv = self.kv_labels()
        contracted = {p.labels[i] for i in pc if self.size[p.labels[i]] != 1}
        if contracted != kv:
            self.fail("second product does not contract the keys")
        v_lab: list[int] = [-1] * len(vshape)
        for i, j in zip(pc, vc, strict=True):
            v_lab[j] = p.labels[i]
        for i, j in zip(pb, vb, strict=True):
            v_lab[j] = p.labels[i]
        for j in range(len(vshape)):
            if v_lab[j] < 0:
                v_lab[j] = self.new("e", vshape[j])
        p_free = [p.labels[i] for i in range(len(p.labels)) if i not in pc and i not in pb]
        v_free = [v_lab[j] for j in range(len(vshape)) if j not in vc and j not in vb]
        batch = [p.labels[i] for i in pb]
        out = tuple(batch + (p_free + v_free if p_first else v_free + p_free))
        if any(self.size[lab] != 1 and lab in kv for lab in p_free):
            self.fail("keys left free")
        return v, tuple(v_lab), out


class _BackwardBuilder:
    """The backward `jax.grad` wrote out for a matched forward, inside the same jaxpr.

    Its equations read the forward's intermediates (P, exp, row sums); JAX's transposes of the
    two products give its edges: dP = dO·Vᵀ (pulled in as the producer of an input), and the
    cotangents of the forward's Q, K and V vars (the products dS·K, dSᵀ·Q and Pᵀ·dO, followed
    by the layout ops that bring them to those vars' shapes). The whole backward is replaced by
    the kernel's own `custom_vjp` backward applied to dO.
    """

    LAYOUT = frozenset({"transpose", "reshape", "convert_element_type", "copy", "squeeze"})

    def __init__(self, matcher: _Matcher, match: AttentionMatch, fwd_vars: set[Any]) -> None:
        self.m = matcher
        self.match = match
        self.fwd_vars = fwd_vars  # the forward's score-derived vars (residuals of the backward)

    def fail(self, why: str) -> None:
        raise _NoMatch(f"an intermediate of the attention is read elsewhere: {why}")

    def attach(self) -> None:
        m, match = self.m, self.match
        eqns = m.jaxpr.eqns
        roles = {"q": match.q, "k": match.k, "v": match.v}
        body: set[int] = set()
        outputs: dict[Any, tuple[str, ...]] = {}
        stack = [u for v in self.fwd_vars for u in m.users.get(v, []) if u not in match.region]
        ct_in: Any = None
        while stack:
            idx = stack.pop()
            if idx in body or idx in match.region:
                continue
            eqn = eqns[idx]
            if eqn.effects:
                self.fail("an effect in the backward")
            body.add(idx)
            for ov in eqn.outvars:
                role = self.classify(eqn, body)
                if role is not None:
                    ov, layout = self.to_role_shape(ov, roles[role[0]])
                    body.update(layout)
                    outputs[ov] = role
                    continue
                stack.extend(u for u in m.users.get(ov, []) if u not in body)
            # dP = dO·Vᵀ: a product of V with something from outside, read by the backward
            for v in eqn.invars:
                if _is_literal(v) or v in self.fwd_vars or v not in m.producer:
                    continue
                chain: list[int] = []
                p = m.producer[v]
                while (eqns[p].primitive.name in self.LAYOUT and p not in body
                       and p not in match.region and eqns[p].invars
                       and not _is_literal(eqns[p].invars[0])
                       and eqns[p].invars[0] in m.producer):
                    chain.append(p)
                    p = m.producer[eqns[p].invars[0]]
                if p in body or p in match.region:
                    continue
                pe = eqns[p]
                if pe.primitive.name == "dot_general" and any(
                        x is match.v for x in pe.invars):
                    other = next(x for x in pe.invars if x is not match.v)
                    if ct_in is not None and other is not ct_in:
                        self.fail("two cotangents of O")
                    ct_in = other
                    stack.append(p)
                    stack.extend(chain)
        if ct_in is None or tuple(_shape(ct_in)) != match.out_shape:
            self.fail("no cotangent of O of the output's shape")
        self.merge_sums(body, outputs)
        produced = {v for i in body for v in eqns[i].outvars}
        for i in body:
            for v in eqns[i].outvars:
                if v in outputs:
                    continue
                if any(u not in body for u in m.users.get(v, [])) or v in m.jaxpr.outvars:
                    self.fail(f"{eqns[i].primitive.name} result leaves the backward")
        for i in body:
            for v in eqns[i].invars:
                if _is_literal(v) or v in produced or v in self.fwd_vars or v is ct_in:
                    continue
                if v in m.dependent and v not in (match.q, match.k, match.v) and not any(
                        v is s.value for s in match.sides):
                    self.fail("the backward reads other data")
        first = [i for i in body if any(v is ct_in for v in eqns[i].invars)]
        if not outputs or not first:
            self.fail("no cotangent leaves the backward")
        match.bwd_region = frozenset(body)
        match.bwd_at = min(first)
        match.ct_in = ct_in
        match.ct_out = outputs

    def classify(self, eqn: Any, body: set[int]) -> tuple[str, ...] | None:
        """The role whose cotangent a product in the backward computes, or None."""
        if eqn.primitive.name != "dot_general":
            return None
        m, match = self.m, self.match
        a, b = eqn.invars
        inner = [x for x in (a, b) if not _is_literal(x) and (
            x in self.fwd_vars or (x in m.producer and m.producer[x] in body))]
        if len(inner) != 1:
            return None
        other = b if inner[0] is a else a
        if other is match.k:
            return ("q",)
        if other is match.q:
            return ("k",)
        if inner[0] in self.fwd_vars and other is not match.v:
            return ("v",)
        return None

    def to_role_shape(self, v: Any, target: Any) -> tuple[Any, list[int]]:
        """Follow single-reader layout ops from a product until the role var's shape."""
        m = self.m
        chain: list[int] = []
        while tuple(_shape(v)) != tuple(_shape(target)):
            users = m.users.get(v, [])
            if len(users) != 1 or m.jaxpr.eqns[users[0]].primitive.name not in self.LAYOUT:
                self.fail("a cotangent does not reach its input's shape")
            chain.append(users[0])
            v = m.jaxpr.eqns[users[0]].outvars[0]
        return v, chain

    def merge_sums(self, body: set[int], outputs: dict[Any, tuple[str, ...]]) -> None:
        """`add_any` of cotangents (an input used in two roles) is one output of both roles."""
        m = self.m
        changed = True
        while changed:
            changed = False
            for v in list(outputs):
                users = m.users.get(v, [])
                if len(users) != 1:
                    continue
                eqn = m.jaxpr.eqns[users[0]]
                if eqn.primitive.name != "add_any" or not all(x in outputs for x in eqn.invars):
                    continue
                merged = tuple(sorted({r for x in eqn.invars for r in outputs[x]}))
                for x in eqn.invars:
                    outputs.pop(x, None)
                body.add(users[0])
                outputs[eqn.outvars[0]] = merged
                changed = True
                break


def _dtype(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.dtype
    return v.aval.dtype


def _shape(v: Any) -> tuple[int, ...]:
    if _is_literal(v):
        return tuple(np.shape(v.val))
    return tuple(v.aval.shape)


# --- running a match ----------------------------------------------------------------------------


def _arrange(x: Any, labels: Sequence[int | None], order: Sequence[int],
             tail: Sequence[Sequence[int]], size: Sequence[int]) -> Any:
    """Transpose/reshape `x` (dims labelled `labels`) to `[*order, *tail groups flattened]`;
    labels of `order` that `x` lacks (or has as size 1) become size-1 dims."""
    pos = {lab: i for i, lab in enumerate(labels) if lab is not None and x.shape[i] != 1}
    keep_unit = [i for i in range(x.ndim) if i not in pos.values()]
    x = jnp.squeeze(x, axis=tuple(keep_unit)) if keep_unit else x
    rank_pos = {lab: n for n, (lab, _i) in enumerate(sorted(pos.items(), key=lambda t: t[1]))}
    wanted = [lab for lab in order if lab in rank_pos] + [
        lab for group in tail for lab in group if lab in rank_pos]
    if len(wanted) != len(rank_pos):
        raise _NoMatch("array has dims outside the kernel's layout")
    x = jnp.transpose(x, [rank_pos[lab] for lab in wanted])
    shape = [size[lab] if lab in rank_pos else 1 for lab in order]
    for group in tail:
        shape.append(math.prod(size[lab] for lab in group if lab in rank_pos))
    return x.reshape(shape)


@dataclass(frozen=True)
class _Tiles:
    block_q: int
    block_k: int
    bwd_block_q: int
    bwd_block_k: int
    source: str


def _run_match(m: AttentionMatch, read: Callable[[Any], Any], tiles: _Tiles, kernel: str,
               interpret: bool, notes: list[str], qkv: tuple[Any, Any, Any] | None = None
               ) -> Any:
    role, size = m.label_role, m.label_size
    q_all = [lab for lab in dict.fromkeys(m.q_labels) if role[lab] == "q" and size[lab] != 1]
    k_all = [lab for lab in dict.fromkeys(m.k_labels) if role[lab] == "k" and size[lab] != 1]
    if len(k_all) != 1:
        raise _NoMatch("the keys span several dims")
    q_main = max(q_all, key=lambda i: (size[i], -i)) if q_all else None
    batch = [lab for lab in dict.fromkeys(m.q_labels) if role[lab] == "b" and size[lab] != 1]
    vm = batch + [lab for lab in q_all if lab != q_main]
    d_labs = [lab for lab in m.q_labels if role[lab] == "d"]
    e_labs = [lab for lab in m.v_labels if role[lab] == "e"]
    qk_row = [q_main] if q_main is not None else []
    q_in, k_in, v_in = qkv if qkv is not None else (read(m.q), read(m.k), read(m.v))
    q = _arrange(q_in, m.q_labels, vm + qk_row, [d_labs], size)
    if q_main is None:
        q = q[..., None, :]
    k = _arrange(k_in, m.k_labels, vm + k_all, [d_labs], size)
    v = _arrange(v_in, m.v_labels, vm + k_all, [e_labs], size)
    sides = []
    for side in m.sides:
        val = jnp.asarray(side.value) if side.concrete else read(side.value)
        if not side.concrete:
            val = jnp.asarray(val)
        arr = _arrange(val, side.labels, vm + qk_row + k_all, [], size)
        if q_main is None:
            arr = arr[..., None, :]
        sides.append(arr)
    transform = LogitsTransform(m.steps)
    out = _attention_kernel(q, k, v, sides, transform, tiles, m.out_dtype, kernel, interpret,
                            notes)
    if q_main is None:
        out = out[..., 0, :]
    e_sizes = [size[lab] for lab in e_labs if size[lab] != 1]
    e_real = [lab for lab in e_labs if size[lab] != 1]
    out = out.reshape((*out.shape[:-1], *e_sizes))
    have = vm + qk_row + e_real
    target = [lab for lab in m.out_labels if size[lab] != 1]
    if sorted(have) != sorted(target):
        raise _NoMatch("output dims differ from the kernel's")
    out = jnp.transpose(out, [have.index(lab) for lab in target])
    return out.reshape(m.out_shape).astype(m.out_dtype)


def _attention_kernel(q: Any, k: Any, v: Any, sides: list[Any], transform: LogitsTransform,
                      tiles: _Tiles, out_dtype: Any, kernel: str, interpret: bool,
                      notes: list[str]) -> Any:
    from tiermap.kernels import pallas

    platform = jax.default_backend()
    choice = kernel
    if choice == "auto":
        choice = {"gpu": "pallas-gpu", "cuda": "pallas-gpu", "rocm": "pallas-gpu",
                  "tpu": "pallas-tpu"}.get(platform, "blocked")
    if choice == "pallas-gpu":
        out, why = pallas.gpu_attention(q, k, v, sides, transform, tiles.block_q, tiles.block_k,
                                        (tiles.bwd_block_q, tiles.bwd_block_k), interpret)
        if out is not None:
            notes.append(f"Pallas GPU mha ({why})")
            return out.astype(out_dtype)
        notes.append(f"Pallas GPU mha not applicable ({why}); blocked JAX kernel")
    elif choice == "pallas-tpu":
        out, why = pallas.tpu_attention(q, k, v, sides, transform, tiles.block_q, tiles.block_k,
                                        interpret)
        if out is not None:
            notes.append(f"Pallas TPU flash_attention ({why})")
            return out.astype(out_dtype)
        notes.append(f"Pallas TPU flash_attention not applicable ({why}); blocked JAX kernel")
    else:
        notes.append("blocked JAX kernel")
    return blocked_attention(q, k, v, sides, transform=transform, block_q=tiles.block_q,
                             block_k=tiles.block_k, out_dtype=out_dtype,
                             backward_blocks=(tiles.bwd_block_q, tiles.bwd_block_k))


# --- the rewriter -------------------------------------------------------------------------------


class _Rewriter:
    """Evaluates a jaxpr with every recognised attention replaced by a tiled kernel."""

    def __init__(self, plan: Plan | None, kernel: str, interpret: bool) -> None:
        self.plan = plan
        self.kernel = kernel
        self.interpret = interpret
        self.notes: list[str] = []
        self.count = 0
        self._ir: list[Any] | None = None
        self._matches: dict[int, tuple[Any, list[AttentionMatch]]] = {}
        self._live: dict[int, list[bool]] = {}

    def ir_patterns(self) -> list[Any]:
        if self._ir is None:
            self._ir = []
            if self.plan is not None and self.plan.program is not None:
                from tiermap.fusion.attention import find_attention

                self._ir = list(find_attention(self.plan.program))
        return self._ir if self._ir is not None else []

    def matches(self, jaxpr: Any, consts: Sequence[Any]) -> list[AttentionMatch]:
        key = id(jaxpr)
        hit = self._matches.get(key)
        if hit is None or hit[0] is not jaxpr:
            matcher = _Matcher(jaxpr, consts)
            hit = (jaxpr, matcher.find())
            self._matches[key] = hit
            self._live[key] = matcher.live
            self.notes.extend(matcher.skipped)
        return hit[1]

    def tiles_for(self, m: AttentionMatch, top_index: int | None) -> _Tiles:
        plan = self.plan
        ir = self.ir_patterns()
        if plan is not None and top_index is not None and top_index < len(ir):
            p = ir[top_index]
            same = (p.q_len, p.kv_len, p.head_dim) == (m.q_len, m.kv_len, m.head_dim)
            fwd = next((t for t in plan.tiles if t.group == f"attn{p.index}"), None)
            bwd = next((t for t in plan.tiles if t.group == f"attn{p.index}_bwd"), None)
            if same and fwd is not None:
                bq, bk = int(fwd.params["block_q"]), int(fwd.params["block_k"])
                if bwd is not None:
                    bbq, bbk = int(bwd.params["block_q_dkv"]), int(bwd.params["block_kv_dkv"])
                else:
                    bbq, bbk = bq, bk
                return _Tiles(bq, bk, bbq, bbk, f"plan group attn{p.index}")
        return self.search_tiles(m)

    def search_tiles(self, m: AttentionMatch) -> _Tiles:
        from tiermap.fusion.tiling import search_forward_tiles, tile_budget_bytes

        dtype = jnp.dtype(m.out_dtype)
        elem = max(2, dtype.itemsize)
        if self.plan is None:
            return _Tiles(128, 128, 128, 128, "default 128x128 (no plan)")
        budget, tier = tile_budget_bytes(self.plan.target)
        try:
            t = search_forward_tiles(m.q_len, m.kv_len, m.head_dim, m.v_head_dim, budget, elem)
        except TiermapError:
            return _Tiles(128, 128, 128, 128, "default 128x128 (no tile fits the target)")
        return _Tiles(t.block_q, t.block_k, t.block_q, t.block_k,
                      f"searched for {self.plan.target.name} {tier} (not in the plan)")

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], top: bool = True
            ) -> list[Any]:
        env = _bind_env(jaxpr, consts, args)

        def read(v: Any) -> Any:
            return v.val if _is_literal(v) else env[v]

        matches = self.matches(jaxpr, consts)
        live = self._live[id(jaxpr)]
        at_d2 = {m.d2: m for m in matches}
        at_bwd = {m.bwd_at: m for m in matches if m.bwd_region}
        skip = set().union(*(m.region | m.bwd_region for m in matches)) if matches else set()
        top_index = {m.d2: n for n, m in enumerate(matches)} if top else {}
        vjps: dict[int, Any] = {}
        for idx, eqn in enumerate(jaxpr.eqns):
            if idx in at_d2:
                m = at_d2[idx]
                tiles = self.tiles_for(m, top_index.get(idx))
                notes: list[str] = []
                try:
                    if m.bwd_region:
                        def fwd(qq: Any, kk: Any, vv: Any, m: AttentionMatch = m,
                                tiles: _Tiles = tiles, notes: list[str] = notes) -> Any:
                            return _run_match(m, read, tiles, self.kernel, self.interpret,
                                              notes, (qq, kk, vv))

                        out, vjps[m.d2] = jax.vjp(fwd, read(m.q), read(m.k), read(m.v))
                        notes.append("its backward (written by jax.grad) replaced by the "
                                     "kernel's recomputing backward")
                    else:
                        out = _run_match(m, read, tiles, self.kernel, self.interpret, notes)
                except _NoMatch as exc:
                    self.notes.append(f"attention {self.count}: left to XLA ({exc})")
                    out = self._replay_region(jaxpr, m, env, read)
                    if m.bwd_region:
                        self._replay(jaxpr, sorted(m.bwd_region), env, read)
                        skip -= m.bwd_region
                else:
                    self.notes.append(
                        f"attention {self.count}: Nq={m.q_len} Nk={m.kv_len} d={m.head_dim}, "
                        f"blocks {tiles.block_q}x{tiles.block_k} ({tiles.source}); "
                        + "; ".join(notes))
                self.count += 1
                env[eqn.outvars[0]] = out
                continue
            if idx in at_bwd and at_bwd[idx].d2 in vjps:
                m = at_bwd[idx]
                cts = dict(zip("qkv", vjps[m.d2](read(m.ct_in)), strict=True))
                for var, roles in m.ct_out.items():
                    total = sum(cts[r] for r in roles[1:]) + cts[roles[0]] if len(
                        roles) > 1 else cts[roles[0]]
                    env[var] = total.astype(var.aval.dtype)
            if idx in skip or not live[idx]:
                continue
            invals = [read(v) for v in eqn.invars]
            if eqn.primitive.name == "scan":
                outs = self._scan(eqn, invals)
            else:
                outs = _bind(eqn, invals)
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def _replay_region(self, jaxpr: Any, m: AttentionMatch, env: dict[Any, Any],
                       read: Callable[[Any], Any]) -> Any:
        self._replay(jaxpr, sorted(m.region), env, read)
        return env[jaxpr.eqns[m.d2].outvars[0]]

    @staticmethod
    def _replay(jaxpr: Any, indices: Sequence[int], env: dict[Any, Any],
                read: Callable[[Any], Any]) -> None:
        """Evaluate these equations now (those whose inputs exist; the rest in program order)."""
        for idx in indices:
            eqn = jaxpr.eqns[idx]
            if not all(_is_literal(v) or v in env for v in eqn.invars):
                continue
            outs = _bind(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o

    def _scan(self, eqn: Any, invals: list[Any]) -> list[Any]:
        params = eqn.params
        body = inline_calls(params["jaxpr"])
        if not self.matches(body.jaxpr, body.consts):
            return _bind(eqn, invals)
        nc, nk = params["num_consts"], params["num_carry"]
        consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

        def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
            outs = self.run(body.jaxpr, body.consts, [*consts, *carry, *x], top=False)
            return outs[:nk], outs[nk:]

        carry, ys = lax.scan(step, list(init), list(xs), length=params["length"],
                             reverse=params["reverse"], unroll=params["unroll"])
        return [*carry, *ys]


# --- host tiers ---------------------------------------------------------------------------------


def host_input_positions(plan: Plan) -> list[int]:
    """Positions (among the program's inputs) of inputs the plan keeps in a host tier at step 0.

    A host tier is a residency tier slower than the target's main-memory tier.
    """
    program = plan.program
    if program is None:
        return []
    names = [t.name for t in plan.target.tiers]
    main = names.index(plan.target.main_tier.name)
    slow = {n for i, n in enumerate(names) if i > main}
    by_id = {t.id: t for t in plan.tensors}
    out = []
    for pos, vid in enumerate(program.inputs):
        t = by_id.get(vid)
        if t is None or not t.residency:
            continue
        first = min(t.residency, key=lambda r: r.from_step)
        if first.tier in slow:
            out.append(pos)
    return out


# --- public surface -----------------------------------------------------------------------------


class AppliedFunction:
    """`fn` as the plan runs it. Call it like `fn`; `.lower(*args).compile()` gives the jax
    Compiled of the program as applied; `.notes` says what was replaced and how."""

    def __init__(self, fn: Callable[..., Any], plan: Plan | None, static_argnums: Sequence[int],
                 static_argnames: Sequence[str], kernel: str, interpret: bool) -> None:
        if kernel not in KERNELS:
            raise TiermapError(f"apply_plan: kernel={kernel!r}; expected one of "
                               f"{', '.join(KERNELS)}")
        self.fn = fn
        self.plan = plan
        self.static_argnums = tuple(static_argnums)
        self.static_argnames = tuple(static_argnames)
        self.kernel = kernel
        self.interpret = interpret
        self.notes: list[str] = []
        self._host_positions = host_input_positions(plan) if plan is not None else []
        self._jitted = jax.jit(self._inner, static_argnums=self.static_argnums,
                               static_argnames=self.static_argnames)
        self.__name__ = getattr(fn, "__name__", "applied")
        self.__doc__ = getattr(fn, "__doc__", None)

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[list[Any], Callable[[list[Any]], tuple[tuple[Any, ...], dict]]]:
        """Dynamic leaves of (args, kwargs) and a function rebuilding them."""
        static_pos = {i % max(len(args), 1) for i in self.static_argnums} if args else set()
        dyn_args = [a for i, a in enumerate(args) if i not in static_pos]
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, tree = jax.tree.flatten((dyn_args, dyn_kwargs))

        def rebuild(new_leaves: list[Any]) -> tuple[tuple[Any, ...], dict]:
            da, dk = jax.tree.unflatten(tree, new_leaves)
            it = iter(da)
            full = tuple(a if i in static_pos else next(it) for i, a in enumerate(args))
            return full, {**kwargs, **dk}

        return leaves, rebuild

    def _inner(self, *args: Any, **kwargs: Any) -> Any:
        leaves, rebuild = self._split(args, kwargs)
        leaves = self._to_device(leaves)
        out_tree: list[Any] = []

        def flat_fn(*xs: Any) -> list[Any]:
            a, k = rebuild(list(xs))
            out = self.fn(*a, **k)
            flat, tree = jax.tree.flatten(out)
            out_tree.append(tree)
            return flat

        closed = jax.make_jaxpr(flat_fn)(*leaves)
        inlined = inline_calls(closed)
        rewriter = _Rewriter(self.plan, self.kernel, self.interpret)
        outs = rewriter.run(inlined.jaxpr, inlined.consts, leaves)
        self.notes = rewriter.notes or ["no attention recognised; the program runs as jax.jit"]
        if self._host_positions:
            self.notes.append(self._host_note())
        return jax.tree.unflatten(out_tree[0], outs)

    def _host_note(self) -> str:
        return (f"inputs {self._host_positions} planned in a host tier: placed in pinned_host "
                "memory and moved to device memory inside the program")

    def _host_kind_available(self) -> bool:
        try:
            kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        except Exception:  # noqa: BLE001 - backends without memories API
            return False
        return "pinned_host" in kinds and "device" in kinds

    def _to_device(self, leaves: list[Any]) -> list[Any]:
        if not self._host_positions or not self._host_kind_available():
            return leaves
        from jax.sharding import SingleDeviceSharding

        dev = jax.devices()[0]
        out = list(leaves)
        for pos in self._host_positions:
            if pos < len(out):
                out[pos] = jax.device_put(out[pos], SingleDeviceSharding(dev, memory_kind="device"))
        return out

    def _place_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self._host_positions:
            return args, kwargs
        if not self._host_kind_available():
            note = ("host-tier inputs: this backend has no pinned_host memory kind; "
                    "inputs stay in device memory")
            if note not in self.notes:
                self.notes.append(note)
            return args, kwargs
        from jax.sharding import SingleDeviceSharding

        leaves, rebuild = self._split(args, kwargs)
        dev = jax.devices()[0]
        host = SingleDeviceSharding(dev, memory_kind="pinned_host")
        for pos in self._host_positions:
            if pos < len(leaves) and hasattr(leaves[pos], "shape"):
                leaves[pos] = jax.device_put(leaves[pos], host)
        return rebuild(leaves)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._place_inputs(args, kwargs)
        return self._jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """The jax `Lowered` of the program as applied (`.compile()` gives the Compiled)."""
        args, kwargs = self._place_inputs(args, kwargs)
        return self._jitted.lower(*args, **kwargs)


def apply_plan(fn: Callable[..., Any], plan: Plan | None, *, static_argnums: Sequence[int] = (),
               static_argnames: Sequence[str] = (), kernel: str = "auto",
               interpret: bool = False) -> AppliedFunction:
    """A function that runs `fn` as `plan` says (module docstring).

    Args:
        fn: the JAX function the plan was made for.
        plan: its Plan (block sizes of attention groups, tiers of inputs); None runs with tiles
            of 128 and no host placement.
        static_argnums, static_argnames: as for `jax.jit`.
        kernel: "auto" (Pallas on GPU/TPU where it applies, else blocked JAX), "blocked",
            "pallas-gpu" or "pallas-tpu" (falling back to blocked where not applicable).
        interpret: run Pallas kernels in interpret mode (for testing without the hardware).

    Returns:
        An `AppliedFunction`: callable like `fn` (jit-compiled), with `.lower(*args)` returning
        the jax Lowered stage and `.notes` listing what was applied.
    """
    return AppliedFunction(fn, plan, static_argnums, static_argnames, kernel, interpret)


def lower_applied(fn: Callable[..., Any], plan: Plan | None, *args: Any,
                  static_argnums: Sequence[int] = (), static_argnames: Sequence[str] = (),
                  **kwargs: Any) -> Any:
    """The jax Compiled of `fn` as `plan` runs it, for these arguments."""
    applied = apply_plan(fn, plan, static_argnums=static_argnums,
                         static_argnames=static_argnames)
    return applied.lower(*args, **kwargs).compile()

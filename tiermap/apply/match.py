"""The jaxpr attention matcher: recognising attention in a jaxpr, its masks, causal ones included.

Each `dot_general` is tried as the first product of an attention: the equations that read its
result are interpreted abstractly (scale, bias, masks, the softmax of `jax.nn.softmax`, flax and
hand-written code, and the second product with V), every tensor dim carrying a label (batch,
query, key, head) so that any layout maps onto the kernel's `[..., N, d]`. A pattern is replaced
only when nothing outside it (or its backward, `tiermap/apply/match_backward.py`) reads its
intermediates; masks that do not depend on the inputs are evaluated once at trace time and
recognised as causal when they are. Left to XLA (with a note): attention whose probabilities are
scaled by data (dropout), a backward that differentiates a bias, and anything else outside these
patterns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tiermap.apply.attention_match import AttentionMatch, NoMatch, Side
from tiermap.apply.jaxpr import bind_eqn, is_literal, live_eqns, var_dtype, var_shape
from tiermap.apply.match_backward import BackwardBuilder

IDENTITY_PRIMITIVES = frozenset({"stop_gradient", "copy", "copy_p", "optimization_barrier"})


@dataclass(frozen=True)
class _AV:
    """Abstract value of a tensor derived from the scores: kind, dim labels, logits steps."""

    kind: str  # L (logits), RMAX, SHIFT, EXP, RSUM, RINV, P
    labels: tuple[int, ...]
    steps: tuple[tuple[Any, ...], ...] = ()


class Matcher:
    """Finds attention patterns in one (inlined) jaxpr."""

    def __init__(self, jaxpr: Any, consts: Sequence[Any]) -> None:
        self.jaxpr = jaxpr
        self.consts = {v: c for v, c in zip(jaxpr.constvars, consts, strict=True)}
        self.live = live_eqns(jaxpr)
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
                if not is_literal(v):
                    self.users.setdefault(v, []).append(idx)
            if any((not is_literal(v)) and v in dependent for v in eqn.invars) or eqn.effects:
                dependent.update(eqn.outvars)
        self._concrete: dict[Any, Any] = {}
        self.skipped: list[str] = []

    # --- concrete evaluation of input-independent values --------------------------------------

    def is_concrete(self, v: Any) -> bool:
        return is_literal(v) or v not in self.dependent

    def concrete(self, v: Any) -> np.ndarray:
        """The value of an input-independent var, computed at trace time."""
        if is_literal(v):
            return np.asarray(v.val)
        if v in self.consts:
            return np.asarray(self.consts[v])
        if v in self._concrete:
            return self._concrete[v]
        needed: set[int] = set()
        stack = [v]
        while stack:
            x = stack.pop()
            if is_literal(x) or x in self.consts or x in self._concrete:
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
                for ov, o in zip(eqn.outvars, bind_eqn(eqn, invals), strict=True):
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
            except NoMatch as exc:
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

    def __init__(self, matcher: Matcher, d1: int) -> None:
        self.m = matcher
        self.d1 = d1
        self.role: list[str] = []
        self.size: list[int] = []
        self.sides: list[Side] = []
        self.kv_side: str | None = None  # "x" (lhs free dims) or "y" (rhs free dims)
        self.saw_softmax = False  # an exp of the logits was seen
        self.noteworthy = False  # an attention for sure (second product or dropout seen)

    def new(self, role: str, size: int) -> int:
        self.role.append("u" if size == 1 else role)
        self.size.append(size)
        return len(self.role) - 1

    def fail(self, why: str) -> None:
        raise NoMatch(why)

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
                    ) -> list[tuple[Side | None, bool]]:
        """Leaves of a side value: (side or None for all-keep, keep_on_true)."""
        m = self.m
        keep = True
        while not is_literal(v) and v in m.producer:
            eqn = m.jaxpr.eqns[m.producer[v]]
            name = eqn.primitive.name
            src = eqn.invars[0] if eqn.invars else None
            if name == "broadcast_in_dim" and src is not None:
                bd = eqn.params["broadcast_dimensions"]
                shp = var_shape(src)
                labels = tuple(labels[bd[i]] if shp[i] != 1 else None for i in range(len(shp)))
            elif name == "reshape" and src is not None:
                if [s for s in var_shape(src) if s != 1] != [s for s in var_shape(v) if s != 1]:
                    break
                real = iter([lab for lab, s in zip(labels, var_shape(v), strict=True) if s != 1])
                labels = tuple(next(real) if s != 1 else None for s in var_shape(src))
            elif name == "transpose" and src is not None:
                perm = eqn.params["permutation"]
                inv = [0] * len(perm)
                for i, p in enumerate(perm):
                    inv[p] = i
                labels = tuple(labels[inv[i]] for i in range(len(perm)))
            elif name == "squeeze" and src is not None:
                dims = set(eqn.params["dimensions"])
                real = iter(labels)
                labels = tuple(None if i in dims else next(real)
                               for i in range(len(var_shape(src))))
            elif name == "convert_element_type" and src is not None and not mask:
                pass
            elif name == "and" and mask and len(eqn.invars) == 2:
                if keep is False:
                    break
                out: list[tuple[Side | None, bool]] = []
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
            return [(Side(arr, labs, True), keep)]
        shp = var_shape(v)
        labs = tuple(lab if shp[i] > 1 else None for i, lab in enumerate(labels))
        return [(Side(v, labs, False), keep)]

    def add_side(self, side: Side) -> int:
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
        ls, rs = var_shape(lhs), var_shape(rhs)
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
            ins = [avs.get(v) if not is_literal(v) else None for v in eqn.invars]
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
            except NoMatch as exc:
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
        p_in = next(v for v in eqns[d2].invars if not is_literal(v) and v in avs)
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
            if any(not s.concrete and jnp.issubdtype(var_dtype(s.value), jnp.floating)
                   for s in self.sides):
                self.fail("an intermediate of the attention is read elsewhere (a backward "
                          "that differentiates a bias is left to XLA)")
            BackwardBuilder(m, match, set(avs)).attach()
            missed = [f"{eqns[i].primitive.name}: {why}" for i, why in foreign
                      if i not in match.bwd_region]
            if missed:
                self.fail(missed[0])
        return match

    def elementwise_labels(self, eqn: Any, ins: list[_AV | None]) -> tuple[int, ...]:
        """Output labels of a broadcasting elementwise op: from the full-size abstract operand."""
        shape = var_shape(eqn.outvars[0])
        for a, v in zip(ins, eqn.invars, strict=True):
            if a is not None and tuple(var_shape(v)) == tuple(shape):
                return a.labels
        # every abstract operand broadcasts: fill unit positions from the others
        labels: list[int | None] = [None] * len(shape)
        for a, v in zip(ins, eqn.invars, strict=True):
            if a is None:
                continue
            for i, (lab, s) in enumerate(zip(a.labels, var_shape(v), strict=True)):
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
            return [_AV(a.kind, self.reshape_labels(a.labels, var_shape(v_in),
                                                    var_shape(eqn.outvars[0])), a.steps)]
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
        in_shape = var_shape(v_in)
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
                if x.steps != y.steps or not self.row_aligned(x, y, var_shape(vy)):
                    self.fail("max of other logits")
                return _AV("SHIFT", x.labels, x.steps)
            if name == "div" and x.kind == "EXP" and y.kind == "RSUM":
                if not self.row_aligned(x, y, var_shape(vy)):
                    self.fail("sum not aligned")
                return _AV("P", x.labels, x.steps)
            if name == "mul" and {x.kind, y.kind} == {"EXP", "RINV"}:
                e, r, vr = (x, y, vy) if x.kind == "EXP" else (y, x, vx)
                if not self.row_aligned(e, r, var_shape(vr)):
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
        shp = var_shape(other)
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
        shp = var_shape(pred)
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
        sides: list[Side] = []
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

    def is_causal(self, side: Side) -> bool:
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
        vshape = var_shape(v)
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

"""The backward `jax.grad` wrote out for a matched attention, found in the same jaxpr.

When `fn` itself differentiates (`jax.grad`, `jax.vjp` inside it), the equations that read the
forward's probabilities and row statistics, bounded by the transposes of the two products
(dP = dO·Vᵀ, and the cotangents of Q, K and V), are matched here so that the rewriter replaces
them, with the forward, by `jax.vjp` of the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tiermap.apply.attention_match import AttentionMatch, NoMatch
from tiermap.apply.jaxpr import is_literal, var_shape

if TYPE_CHECKING:
    from tiermap.apply.match import Matcher


class BackwardBuilder:
    """The backward `jax.grad` wrote out for a matched forward, inside the same jaxpr.

    Its equations read the forward's intermediates (P, exp, row sums); JAX's transposes of the
    two products give its edges: dP = dO·Vᵀ (pulled in as the producer of an input), and the
    cotangents of the forward's Q, K and V vars (the products dS·K, dSᵀ·Q and Pᵀ·dO, followed
    by the layout ops that bring them to those vars' shapes). The whole backward is replaced by
    the kernel's own `custom_vjp` backward applied to dO.
    """

    LAYOUT = frozenset({"transpose", "reshape", "convert_element_type", "copy", "squeeze"})

    def __init__(self, matcher: Matcher, match: AttentionMatch, fwd_vars: set[Any]) -> None:
        self.m = matcher
        self.match = match
        self.fwd_vars = fwd_vars  # the forward's score-derived vars (residuals of the backward)

    def fail(self, why: str) -> None:
        raise NoMatch(f"an intermediate of the attention is read elsewhere: {why}")

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
                if is_literal(v) or v in self.fwd_vars or v not in m.producer:
                    continue
                chain: list[int] = []
                p = m.producer[v]
                while (eqns[p].primitive.name in self.LAYOUT and p not in body
                       and p not in match.region and eqns[p].invars
                       and not is_literal(eqns[p].invars[0])
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
        if ct_in is None or tuple(var_shape(ct_in)) != match.out_shape:
            self.fail("no cotangent of O of the output's shape")
        self.merge_sums(body, outputs)
        produced = {v for i in body for v in eqns[i].outvars}
        for i in body:
            for v in eqns[i].outvars:
                if v in outputs:
                    continue
                if any(u not in body for u in m.users.get(v, [])) or v in m.jaxpr.outvars:
                    self.fail(f"{eqns[i].primitive.name} result leaves the backward")
        masks = self.side_derived()
        for i in body:
            for v in eqns[i].invars:
                if is_literal(v) or v in produced or v in self.fwd_vars or v is ct_in:
                    continue
                if v in m.dependent and v not in (match.q, match.k, match.v) and not any(
                        v is s.value for s in match.sides) and v not in masks:
                    self.fail("the backward reads other data")
        first = [i for i in body if any(v is ct_in for v in eqns[i].invars)]
        if not outputs or not first:
            self.fail("no cotangent leaves the backward")
        match.bwd_region = frozenset(body)
        match.bwd_at = min(first)
        match.ct_in = ct_in
        match.ct_out = outputs

    def side_derived(self) -> set[Any]:
        """Vars computed from the forward's side inputs (masks, biases) and constants only: a
        merged mask (keras ANDs its causal and padding masks), which the kernel rebuilds from the
        sides it reads, so a backward reading it reads nothing the kernel lacks."""
        m, match = self.m, self.match
        out: set[Any] = {s.value for s in match.sides if not s.concrete}
        for eqn in m.jaxpr.eqns:
            ins = [v for v in eqn.invars if not is_literal(v)]
            if ins and all(v in out or v not in m.dependent for v in ins) and any(
                    v in out for v in ins):
                out.update(eqn.outvars)
        return out

    def classify(self, eqn: Any, body: set[int]) -> tuple[str, ...] | None:
        """The role whose cotangent a product in the backward computes, or None."""
        if eqn.primitive.name != "dot_general":
            return None
        m, match = self.m, self.match
        a, b = eqn.invars
        inner = [x for x in (a, b) if not is_literal(x) and (
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
        while tuple(var_shape(v)) != tuple(var_shape(target)):
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

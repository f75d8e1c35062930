"""Attention split across jax.grad's two scans, run as the paired kernels the plan chose.

jax.grad of a `lax.scan` is two scans in the jaxpr: the forward one, which stacks every residual
the backward needs (its `ys`), and the transposed one, which reads them back in reverse as its
`xs`. An attention in the scanned body leaves its probabilities among those residuals, so neither
body holds a whole attention and the matcher finds none in either. The planner pairs the two
halves (tiermap/loop_pairing.py); this module does the same for the program that runs:

1. `find_scan_pairs`: for each forward scan whose residual stacks go straight into a later scan,
   the two bodies are joined into one jaxpr (the second body's slices replaced by the first
   body's values that fill their stacks, the scans' constants made concrete where the outer
   program computes them from constants) and matched with the ordinary matcher
   (`tiermap/apply/match.py`, its backward by `match_backward.py`). A match whose forward lies in
   the first body and whose backward lies in the second becomes a `ScanPair`.
2. The forward scan runs its body with the attention replaced by `jax.vjp` of the tiled kernel;
   the vjp's residuals (the kernel's Q, K, V, O and log-sum-exp) become extra `ys` of the scan,
   and the score-shaped residuals the backward no longer reads are left out (unused outputs,
   which XLA drops).
3. The transposed scan reads those residual slices as extra `xs` and runs the kernel's own
   recomputing backward (the vjp rebuilt from its slices) in place of the backward jax.grad
   wrote; the score slices are not passed in.

A pair is taken only when every value it drops is read by nothing else; otherwise the two scans
run as written, with a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from tiermap.apply.attention_match import AttentionMatch
from tiermap.apply.jaxpr import bind_env, bind_eqn, inline_calls, is_literal
from tiermap.apply.match import Matcher


@dataclass
class ScanPair:
    """An attention whose forward is in scan `a` and whose backward is in scan `b`.

    Attributes:
        a, b: indices of the two scan equations in the enclosing jaxpr.
        body_a, body_b: their bodies (inlined ClosedJaxprs; indices below refer to them).
        match: the attention, in the joined jaxpr's vars (`q`, `k`, `v` and sides are the first
            body's; `ct_in` and `ct_out` the second's).
        skip_a, skip_b: equations of each body the kernels replace.
        d2: the first body's equation whose result is the attention's output.
        bwd_at: the second body's equation where the backward runs.
        dropped_ys: positions among the first scan's ys no longer produced (placeholders).
        dropped_xs: positions among the second scan's xs no longer passed.
        treedef: the kernel vjp's structure, set when the forward scan is traced.
    """

    a: int
    b: int
    body_a: Any
    body_b: Any
    match: AttentionMatch
    skip_a: frozenset[int]
    skip_b: frozenset[int]
    d2: int
    bwd_at: int
    dropped_ys: frozenset[int]
    dropped_xs: frozenset[int]
    treedef: Any = None
    leaves: list[Any] = field(default_factory=list)
    kernel: Any = None  # (match, read, (q, k, v)) -> the attention's output, tiled
    notes: list[str] = field(default_factory=list)


def _concrete_consts(eqn: Any, outer: Matcher) -> list[tuple[int, Any]]:
    """(position, value) of the scan's constants that the enclosing program computes from
    constants only (causal masks and their fill values, which jax.grad hoists out of the
    body)."""
    out = []
    for j, ov in enumerate(eqn.invars[:eqn.params["num_consts"]]):
        if is_literal(ov):
            out.append((j, ov.val))
        elif outer.is_concrete(ov):
            out.append((j, outer.concrete(ov)))
    return out


def find_scan_pairs(jaxpr: Any, outer: Matcher) -> tuple[list[ScanPair], list[str]]:
    """The paired attentions of `jaxpr`'s top-level scans (module docstring), and notes."""
    eqns = jaxpr.eqns
    scans = [i for i, e in enumerate(eqns) if e.primitive.name == "scan" and outer.live[i]]
    users: dict[Any, list[int]] = {}
    for i, e in enumerate(eqns):
        for v in e.invars:
            if not is_literal(v):
                users.setdefault(v, []).append(i)
    outvars = {v for v in jaxpr.outvars if not is_literal(v)}
    pairs: list[ScanPair] = []
    notes: list[str] = []
    taken: set[int] = set()
    for a in scans:
        ea = eqns[a]
        nka = ea.params["num_carry"]
        ys = ea.outvars[nka:]
        later = {u for v in ys for u in users.get(v, []) if u in scans and u > a}
        for b in sorted(later):
            if a in taken or b in taken:
                continue
            eb = eqns[b]
            ncb, nkb = eb.params["num_consts"], eb.params["num_carry"]
            pos_b = {v: j for j, v in enumerate(eb.invars) if j >= ncb + nkb}
            links = {k: pos_b[v] for k, v in enumerate(ys) if v in pos_b}
            if not links:
                continue
            pair = _pair(ea, eb, a, b, links, outer)
            if pair is None:
                continue
            # What the pair drops must be read by nothing but the second scan.
            if any(users.get(ys[k], []) != [b] or ys[k] in outvars for k in pair.dropped_ys):
                notes.append(f"scans {a} and {b}: an attention split across them was left to "
                             "XLA (a residual it drops is read elsewhere)")
                continue
            pairs.append(pair)
            taken |= {a, b}
    return pairs, notes


def _pair(ea: Any, eb: Any, a: int, b: int, links: dict[int, int], outer: Matcher
          ) -> ScanPair | None:
    body_a, body_b = inline_calls(ea.params["jaxpr"]), inline_calls(eb.params["jaxpr"])
    ja, jb = body_a.jaxpr, body_b.jaxpr
    nka = ea.params["num_carry"]
    # inline_calls keeps the body's invars in order, so the known constants map by position.
    known_a = [(ja.invars[j], c) for j, c in _concrete_consts(ea, outer)]
    known_b = [(jb.invars[j], c) for j, c in _concrete_consts(eb, outer)]
    sub = {jb.invars[j]: ja.outvars[nka + k] for k, j in links.items()}

    def rv(v: Any) -> Any:
        return v if is_literal(v) else sub.get(v, v)

    n1 = len(ja.eqns)
    eqns = list(ja.eqns) + [e.replace(invars=[rv(v) for v in e.invars]) for e in jb.eqns]
    known = {v for v, _ in known_a + known_b}
    constvars = [*ja.constvars, *(v for v, _ in known_a), *jb.constvars,
                 *(v for v, _ in known_b)]
    consts = [*body_a.consts, *(c for _, c in known_a), *body_b.consts,
              *(c for _, c in known_b)]
    invars = [v for v in ja.invars if v not in known] + [
        v for v in jb.invars if v not in sub and v not in known]
    outvars = [*ja.outvars[:nka], *(rv(v) for v in jb.outvars)]
    with warnings.catch_warnings():  # a jaxpr for matching only: it needs no debug info
        warnings.simplefilter("ignore", DeprecationWarning)
        joined = jcore.Jaxpr(constvars, invars, outvars, eqns)
    found = Matcher(joined, consts).find()
    for m in found:
        if not m.bwd_region or max(m.region) >= n1 or m.bwd_at < n1:
            continue
        skip_a = frozenset(i for i in m.region | m.bwd_region if i < n1)
        skip_b = frozenset(i - n1 for i in m.bwd_region if i >= n1)
        # What the first body no longer computes (the kernel gives the attention's output).
        made_a = {v for i in skip_a for v in ja.eqns[i].outvars} - {ja.eqns[m.d2].outvars[0]}
        dropped_ys = frozenset(k for k in range(len(ja.outvars) - nka)
                               if ja.outvars[nka + k] in made_a)
        if any(ja.outvars[j] in made_a for j in range(nka)):
            continue  # a carry comes out of the attention's insides
        # The second body's xs that carry what the first no longer produces: only the
        # replaced backward may read them.
        read_b: set[Any] = set()
        for i, e in enumerate(jb.eqns):
            if i not in skip_b:
                read_b.update(v for v in e.invars if not is_literal(v))
        read_b.update(v for v in jb.outvars if not is_literal(v))
        ncb, nkb = eb.params["num_consts"], eb.params["num_carry"]
        dropped_xs = frozenset(links[k] - ncb - nkb for k in dropped_ys if k in links)
        if any(jb.invars[ncb + nkb + x] in read_b for x in dropped_xs):
            continue
        if any(k not in links for k in dropped_ys):
            continue
        return ScanPair(a=a, b=b, body_a=body_a, body_b=body_b, match=m, skip_a=skip_a,
                        skip_b=skip_b, d2=m.d2, bwd_at=m.bwd_at - n1, dropped_ys=dropped_ys,
                        dropped_xs=dropped_xs)
    return None


def _bind(eqn: Any, read: Callable[[Any], Any], env: dict[Any, Any]) -> None:
    """Evaluate one equation into `env`."""
    outs = bind_eqn(eqn, [read(v) for v in eqn.invars])
    for v, o in zip(eqn.outvars, outs, strict=True):
        if not isinstance(v, jcore.DropVar):
            env[v] = o


KernelFn = Callable[[AttentionMatch, Callable[[Any], Any], tuple[Any, Any, Any]], Any]


def run_forward_scan(pair: ScanPair, eqn: Any, invals: Sequence[Any], kernel: KernelFn
                     ) -> list[Any]:
    """The forward scan with the attention run as `jax.vjp` of the kernel; the kernel's
    residuals are extra ys (`pair.leaves`, stacked), the dropped ys are placeholders."""
    params = eqn.params
    nc, nk = params["num_consts"], params["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    body = pair.body_a
    jaxpr = body.jaxpr
    m = pair.match

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], tuple[list[Any], list[Any]]]:
        env = bind_env(jaxpr, body.consts, [*consts, *carry, *x])

        def read(v: Any) -> Any:
            return v.val if is_literal(v) else env[v]

        leaves: list[Any] = []
        for idx, e in enumerate(jaxpr.eqns):
            if idx == pair.d2:
                def fwd(q: Any, k: Any, v: Any) -> Any:
                    return kernel(m, read, (q, k, v))

                out, vjp_fn = jax.vjp(fwd, read(m.q), read(m.k), read(m.v))
                leaves, pair.treedef = jax.tree_util.tree_flatten(vjp_fn)
                env[e.outvars[0]] = out
                continue
            if idx not in pair.skip_a:
                _bind(e, read, env)
        out_vals = []
        for j, v in enumerate(jaxpr.outvars):
            if j >= nk and (j - nk) in pair.dropped_ys:
                out_vals.append(jnp.zeros(v.aval.shape, v.aval.dtype))  # unused: dropped
            else:
                out_vals.append(read(v))
        return out_vals[:nk], (out_vals[nk:], list(leaves))

    carry, (ys, stacked) = jax.lax.scan(step, list(init), list(xs), length=params["length"],
                                        reverse=params["reverse"], unroll=params["unroll"])
    pair.leaves = list(stacked)
    return [*carry, *ys]


def run_backward_scan(pair: ScanPair, eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """The transposed scan with the backward jax.grad wrote replaced by the kernel's own,
    rebuilt from the forward scan's residual slices; the dropped xs are not passed."""
    params = eqn.params
    nc, nk = params["num_consts"], params["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], list(invals[nc + nk:])
    body = pair.body_b
    jaxpr = body.jaxpr
    m = pair.match
    kept = [j for j in range(len(xs)) if j not in pair.dropped_xs]
    dropped_avals = {j: jaxpr.invars[nc + nk + j].aval for j in pair.dropped_xs}
    treedef = pair.treedef

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        own, leaf_slices = x[:len(kept)], x[len(kept):]
        full: list[Any] = [None] * len(xs)
        for j, val in zip(kept, own, strict=True):
            full[j] = val
        for j, aval in dropped_avals.items():
            full[j] = jnp.zeros(aval.shape, aval.dtype)  # never read: the backward is replaced
        env = bind_env(jaxpr, body.consts, [*consts, *carry, *full])

        def read(v: Any) -> Any:
            return v.val if is_literal(v) else env[v]

        for idx, e in enumerate(jaxpr.eqns):
            if idx == pair.bwd_at:
                vjp_fn = jax.tree_util.tree_unflatten(treedef, list(leaf_slices))
                cts = dict(zip("qkv", vjp_fn(read(m.ct_in)), strict=True))
                for var, roles in m.ct_out.items():
                    total = cts[roles[0]]
                    for r in roles[1:]:
                        total = total + cts[r]
                    env[var] = total.astype(var.aval.dtype)
            if idx not in pair.skip_b:
                _bind(e, read, env)
        outs = [read(v) for v in jaxpr.outvars]
        return outs[:nk], outs[nk:]

    carry, ys = jax.lax.scan(step, list(init), [*(xs[j] for j in kept), *pair.leaves],
                             length=params["length"], reverse=params["reverse"],
                             unroll=params["unroll"])
    return [*carry, *ys]

"""The rewriter: a jaxpr re-interpreted with every matched attention replaced by a tiled kernel.

Calls to `jit`-wrapped functions are inlined before matching (`tiermap/apply/match.py`); `scan`
bodies (flax `nn.scan`) are rewritten too. An attention gets the block sizes of the plan's
attention group that covers the same equations: the plan records, per group, the positions of its
two matmuls among the program's top-level `dot_general` ops (`Plan.attention`), and the rewriter
counts the jaxpr's live top-level `dot_general` equations the same way; no recognition is re-run
on the IR. Inside a `scan` whose `while` op the plan planned as a loop (`Plan.loops`, matched by
the position among top-level loops and the trip count), the body's attention gets the tiles of
the body plan's groups, counted the same way among the body's `dot_general` equations. Patterns
the plan does not cover (where shapes differ, or a loop the plan kept opaque) get tiles searched
for the plan's target on the spot, and the notes say so. The kernel
is JAX's Pallas flash attention on GPU and TPU where it accepts the pattern, and the blocked JAX
kernel of `tiermap/kernels/blocked_attention.py` everywhere else. A matched backward is replaced,
with its forward, by `jax.vjp` of the kernel (its recomputing, tiled `custom_vjp` backward).
An attention split across jax.grad's two scans (forward in one, backward in the transposed
one) is run as the paired kernels of `tiermap/apply/scan_pairs.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from tiermap.apply.attention_match import AttentionMatch, NoMatch
from tiermap.apply.jaxpr import bind_env, bind_eqn, inline_calls, is_literal
from tiermap.apply.match import Matcher
from tiermap.apply.offload import OffloadRun
from tiermap.apply.recompute import RecomputeRun
from tiermap.apply.scan_pairs import ScanPair, find_scan_pairs, run_backward_scan, run_forward_scan
from tiermap.errors import TiermapError
from tiermap.fusion.tiling import search_forward_tiles, tile_budget_bytes
from tiermap.ir.decisions import Decision
from tiermap.ir.plan import LoopPlan, Plan
from tiermap.kernels import pallas
from tiermap.kernels.blocked_attention import LogitsTransform, blocked_attention

# How an attention the matcher finds, and no attention group of the plan covers, is named.
NO_PLAN_GROUP = " (no plan group)"

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
        raise NoMatch("array has dims outside the kernel's layout")
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
        raise NoMatch("the keys span several dims")
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
        raise NoMatch("output dims differ from the kernel's")
    out = jnp.transpose(out, [have.index(lab) for lab in target])
    return out.reshape(m.out_shape).astype(m.out_dtype)


def _attention_kernel(q: Any, k: Any, v: Any, sides: list[Any], transform: LogitsTransform,
                      tiles: _Tiles, out_dtype: Any, kernel: str, interpret: bool,
                      notes: list[str]) -> Any:
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


def _paired_kernel(m: AttentionMatch, read: Callable[[Any], Any], qkv: tuple[Any, Any, Any],
                   tiles: _Tiles, kernel: str, interpret: bool, notes: list[str]) -> Any:
    """The tiled kernel of an attention paired across two scans (`scan_pairs`)."""
    return _run_match(m, read, tiles, kernel, interpret, notes, qkv)


# --- the rewriter -------------------------------------------------------------------------------


class Rewriter:
    """Evaluates a jaxpr with every recognised attention replaced by a tiled kernel."""

    def __init__(self, plan: Plan | None, kernel: str, interpret: bool,
                 planned_only: bool = False) -> None:
        self.plan = plan
        # Leave to XLA an attention the plan does not fuse (else it runs with searched tiles).
        self.planned_only = planned_only
        self.kernel = kernel
        self.interpret = interpret
        self.notes: list[str] = []
        self.count = 0
        # Where the plan being applied sits: "" at the top, "loop op48's body" inside a loop.
        self.where = ""
        self._matches: dict[int, tuple[Any, list[AttentionMatch]]] = {}
        self._live: dict[int, list[bool]] = {}
        # The plan's host moves of top-level tensors (tiermap/apply/offload.py), if any.
        self.offload: OffloadRun | None = None
        self.recompute: RecomputeRun | None = None
        # One per attention the matcher found: replaced by a kernel or left to XLA.
        self.decisions: list[Decision] = []
        self.groups_seen: set[str] = set()
        # Why the matcher passed over attention-like patterns (also in `notes`).
        self.skipped: list[str] = []

    def matches(self, jaxpr: Any, consts: Sequence[Any]) -> list[AttentionMatch]:
        key = id(jaxpr)
        hit = self._matches.get(key)
        if hit is None or hit[0] is not jaxpr:
            matcher = Matcher(jaxpr, consts)
            hit = (jaxpr, matcher.find())
            self._matches[key] = hit
            self._live[key] = matcher.live
            self.notes.extend(matcher.skipped)
            self.skipped.extend(matcher.skipped)
        return hit[1]

    def group_name(self, d1: int | None, d2: int | None) -> str:
        """The plan's attention group whose matmuls are the `dot_general`s at (d1, d2), with
        the loop body it sits in; `attention <n>` (the n-th matched) where none is."""
        inside = f" of {self.where}" if self.where else ""
        if self.plan is not None and d1 is not None and d2 is not None:
            group = next((a for a in self.plan.attention if a.matmul_ordinals == (d1, d2)),
                         None)
            if group is not None:
                self.groups_seen.add(group.group + inside)
                return group.group + inside
        return f"attention {self.count}{inside}{NO_PLAN_GROUP}"

    def tiles_for(self, m: AttentionMatch, ordinals: tuple[int, int] | None) -> _Tiles:
        """The plan's tiles for the attention whose matmuls are the top-level `dot_general`
        equations at `ordinals` (the plan records them per group), else tiles searched for the
        target (said so in the notes)."""
        plan = self.plan
        if plan is not None and ordinals is not None:
            group = next((a for a in plan.attention if a.matmul_ordinals == ordinals), None)
            same = group is not None and (group.q_len, group.kv_len, group.head_dim) == (
                m.q_len, m.kv_len, m.head_dim)
            if group is not None and same:
                fwd = next((t for t in plan.tiles if t.group == group.group), None)
                bwd = next((t for t in plan.tiles if t.group == group.backward_group), None)
                if fwd is not None:
                    bq, bk = int(fwd.params["block_q"]), int(fwd.params["block_k"])
                    if bwd is not None:
                        bbq = int(bwd.params["block_q_dkv"])
                        bbk = int(bwd.params["block_kv_dkv"])
                    else:
                        bbq, bbk = bq, bk
                    inside = f" of {self.where}" if self.where else ""
                    return _Tiles(bq, bk, bbq, bbk, f"plan group {group.group}{inside}")
        return self.search_tiles(m)

    def search_tiles(self, m: AttentionMatch) -> _Tiles:
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
        env = bind_env(jaxpr, consts, args)
        offload = self.offload if top else None

        def read(v: Any) -> Any:
            if is_literal(v):
                return v.val
            return offload.read(v, env) if offload is not None else env[v]

        matches = self.matches(jaxpr, consts)
        live = self._live[id(jaxpr)]
        at_d2 = {m.d2: m for m in matches}
        at_bwd = {m.bwd_at: m for m in matches if m.bwd_region}
        skip = set().union(*(m.region | m.bwd_region for m in matches)) if matches else set()
        # Top-level dot_general equations in program order, as the plan counts them (its
        # AttentionGroupPlan.matmul_ordinals); nested bodies are not planned yet.
        dots = [i for i, e in enumerate(jaxpr.eqns)
                if live[i] and e.primitive.name == "dot_general"]
        dot_ordinal = {i: n for n, i in enumerate(dots)} if top else {}
        # Loops in program order, as the IR keeps them (`while` ops, each maybe a Plan.loops).
        loop_eqns = [i for i, e in enumerate(jaxpr.eqns)
                     if live[i] and e.primitive.name in ("scan", "while")]
        loop_ordinal = {i: n for n, i in enumerate(loop_eqns)} if top else {}
        vjps: dict[int, Any] = {}
        pairs_a, pairs_b = self.scan_pairs(jaxpr, consts, loop_ordinal) if top else ({}, {})
        deferred: set[int] = set()
        recomputed: set[int] = set()  # equations of kernels whose backward recomputes
        read_later = self._reader_index(jaxpr, matches, live, skip) if offload else None
        for idx, eqn in enumerate(jaxpr.eqns):
            if top and self.recompute is not None:
                self.recompute.fire(idx, env, jaxpr, skip, read)
            if offload is not None and read_later is not None:
                offload.fire(idx, env, read_later, skip, recomputed)
            if idx in at_d2:
                m = at_d2[idx]
                d1, d2 = dot_ordinal.get(m.d1), dot_ordinal.get(m.d2)
                tiles = self.tiles_for(m, (d1, d2) if d1 is not None and d2 is not None
                                       else None)
                notes: list[str] = []
                subject = self.group_name(d1, d2)
                if self.planned_only and self.plan is not None and subject.endswith(
                        NO_PLAN_GROUP):
                    # The plan prices these equations unfused: run them so.
                    self.notes.append(f"attention {self.count}: left to XLA, as the plan has "
                                      "it (no attention group of the plan covers it)")
                    out = self._replay_region(jaxpr, m, env, read)
                    if m.bwd_region:
                        self._replay(jaxpr, sorted(m.bwd_region), env, read)
                        skip -= m.bwd_region
                    self.count += 1
                    env[eqn.outvars[0]] = out
                    continue
                try:
                    if m.bwd_region:
                        def fwd(qq: Any, kk: Any, vv: Any, m: AttentionMatch = m,
                                tiles: _Tiles = tiles, notes: list[str] = notes) -> Any:
                            return _run_match(m, read, tiles, self.kernel, self.interpret,
                                              notes, (qq, kk, vv))

                        if ((offload is not None and offload.moves_any((m.q, m.k, m.v)))
                                or (self.recompute is not None
                                    and self.recompute.replaces_any((m.q, m.k, m.v)))):
                            # The plan moves Q, K or V to host until the backward, or drops
                            # and recomputes it: the backward recomputes the forward from the
                            # copies it reads then, so the forward's residuals do not pin them.
                            out = fwd(read(m.q), read(m.k), read(m.v))
                            vjps[m.d2] = fwd
                            deferred.add(m.d2)
                            recomputed.update(m.region)
                            notes.append("its backward (written by jax.grad) replaced by the "
                                         "kernel's recomputing backward, which recomputes the "
                                         "forward from Q, K, V as the plan brings them back "
                                         "from host or recomputes them (one forward attention "
                                         "more than the plan prices)")
                        else:
                            out, vjps[m.d2] = jax.vjp(fwd, read(m.q), read(m.k), read(m.v))
                            notes.append("its backward (written by jax.grad) replaced by the "
                                         "kernel's recomputing backward")
                    else:
                        out = _run_match(m, read, tiles, self.kernel, self.interpret, notes)
                except NoMatch as exc:
                    self.notes.append(f"attention {self.count}: left to XLA ({exc})")
                    self.decisions.append(Decision("attention", subject, False,
                                                   f"left to XLA: {exc}"))
                    out = self._replay_region(jaxpr, m, env, read)
                    if m.bwd_region:
                        self._replay(jaxpr, sorted(m.bwd_region), env, read)
                        skip -= m.bwd_region
                else:
                    self.notes.append(
                        f"attention {self.count}: Nq={m.q_len} Nk={m.kv_len} d={m.head_dim}, "
                        f"blocks {tiles.block_q}x{tiles.block_k} ({tiles.source}); "
                        + "; ".join(notes))
                    self.decisions.append(Decision(
                        "attention", subject, True,
                        f"tiled kernel, blocks {tiles.block_q}x{tiles.block_k} "
                        f"({tiles.source}); " + "; ".join(notes)))
                self.count += 1
                env[eqn.outvars[0]] = out
                continue
            if idx in at_bwd and at_bwd[idx].d2 in vjps:
                m = at_bwd[idx]
                pullback = vjps[m.d2]
                if m.d2 in deferred:  # a forward to differentiate now
                    _, pullback = jax.vjp(pullback, read(m.q), read(m.k), read(m.v))
                cts = dict(zip("qkv", pullback(read(m.ct_in)), strict=True))
                for var, roles in m.ct_out.items():
                    total = sum(cts[r] for r in roles[1:]) + cts[roles[0]] if len(
                        roles) > 1 else cts[roles[0]]
                    env[var] = total.astype(var.aval.dtype)
            if idx in skip or not live[idx]:
                continue
            invals = [read(v) for v in eqn.invars]
            if idx in pairs_a:
                outs = run_forward_scan(pairs_a[idx], eqn, invals, pairs_a[idx].kernel)
            elif idx in pairs_b:
                outs = run_backward_scan(pairs_b[idx], eqn, invals)
            elif eqn.primitive.name == "scan":
                outs = self._scan(eqn, invals, loop_ordinal.get(idx))
            else:
                outs = bind_eqn(eqn, invals)
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        if offload is not None and read_later is not None:
            offload.finish(len(jaxpr.eqns), env, read_later, skip, recomputed)
        return [read(v) for v in jaxpr.outvars]

    @staticmethod
    def _reader_index(jaxpr: Any, matches: Sequence[AttentionMatch], live: Sequence[bool],
                      skip: set[int]) -> Callable[[Any, int], bool]:
        """`read_later(var, idx)`: whether equation `idx` or a later one reads `var` in the
        program as applied (live equations outside the regions replaced by kernels, the
        kernels' own inputs, the program's outputs). `skip` is read when asked, so a kernel
        that fell back to XLA counts its equations again."""
        readers: dict[Any, list[int]] = {}
        for i, e in enumerate(jaxpr.eqns):
            if live[i]:
                for v in e.invars:
                    if not is_literal(v):
                        readers.setdefault(v, []).append(i)
        kernel: dict[Any, list[int]] = {}
        for m in matches:
            for v in (m.q, m.k, m.v, *(s.value for s in m.sides if not s.concrete)):
                if not is_literal(v):
                    kernel.setdefault(v, []).append(m.d2)
            if m.bwd_region and m.ct_in is not None and not is_literal(m.ct_in):
                kernel.setdefault(m.ct_in, []).append(m.bwd_at)
            if m.bwd_region:  # a backward that recomputes reads Q, K and V there
                for v in (m.q, m.k, m.v):
                    if not is_literal(v):
                        kernel.setdefault(v, []).append(m.bwd_at)
        outs = {v for v in jaxpr.outvars if not is_literal(v)}

        def read_later(v: Any, idx: int) -> bool:
            return (v in outs or any(j >= idx for j in kernel.get(v, ()))
                    or any(j >= idx and j not in skip for j in readers.get(v, ())))

        return read_later

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
            if not all(is_literal(v) or v in env for v in eqn.invars):
                continue
            outs = bind_eqn(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o

    def scan_pairs(self, jaxpr: Any, consts: Sequence[Any], loop_ordinal: dict[int, int]
                   ) -> tuple[dict[int, ScanPair], dict[int, ScanPair]]:
        """Attention split across jax.grad's two scans (tiermap/apply/scan_pairs.py), by the
        index of the forward scan and of the transposed one; each pair's kernel gets the tiles
        of the forward loop's body plan."""
        if not any(e.primitive.name == "scan" for e in jaxpr.eqns):
            return {}, {}
        try:
            pairs, notes = find_scan_pairs(jaxpr, Matcher(jaxpr, consts))
        except (NoMatch, ValueError, KeyError, IndexError) as exc:
            self.notes.append(f"scans: an attention split across two scans was not paired "
                              f"({type(exc).__name__}: {exc}); they run as written")
            return {}, {}
        self.notes.extend(notes)
        by_a, by_b = {}, {}
        for pair in pairs:
            length = int(jaxpr.eqns[pair.a].params["length"])
            loop = self.loop_plan(loop_ordinal.get(pair.a), length)
            back = self.loop_plan(loop_ordinal.get(pair.b), length)
            body = pair.body_a.jaxpr
            dots = [i for i, e in enumerate(body.eqns) if e.primitive.name == "dot_general"]
            ordinals = (dots.index(pair.match.d1), dots.index(pair.match.d2))
            outer_plan, outer_where = self.plan, self.where
            self.plan = loop.body if loop is not None else outer_plan
            self.where = f"loop {loop.op_id}'s body" if loop is not None else outer_where
            try:
                if loop is not None:
                    # The body plan counts its dots in its own order; where that differs from
                    # the jaxpr's, the body's one attention of this size is the same one.
                    same = [a for a in loop.body.attention
                            if (a.q_len, a.kv_len, a.head_dim) == (
                                pair.match.q_len, pair.match.kv_len, pair.match.head_dim)]
                    if not any(a.matmul_ordinals == ordinals for a in same) and len(same) == 1:
                        ordinals = tuple(same[0].matmul_ordinals)  # type: ignore[assignment]
                tiles = self.tiles_for(pair.match, ordinals if loop is not None else None)
                subject = self.group_name(*ordinals) if loop is not None else (
                    f"attention {self.count} (no plan group)")
            finally:
                self.plan, self.where = outer_plan, outer_where
            notes_k: list[str] = []
            pair.kernel = functools.partial(_paired_kernel, tiles=tiles, kernel=self.kernel,
                                            interpret=self.interpret, notes=notes_k)
            m = pair.match
            loops = (f" (loops {loop.op_id} and {back.op_id})"
                     if loop is not None and back is not None else "")
            self.notes.append(
                f"attention {self.count}: Nq={m.q_len} Nk={m.kv_len} d={m.head_dim}, split "
                f"across jax.grad's two scans{loops}: "
                f"forward blocks {tiles.block_q}x{tiles.block_k} ({tiles.source}), the "
                "transposed scan runs the kernel's recomputing backward; "
                f"{len(pair.dropped_ys)} residual stack(s) of its insides are not stored")
            self.decisions.append(Decision(
                "attention", subject, True,
                f"paired across jax.grad's two scans{loops}: tiled forward kernel, blocks "
                f"{tiles.block_q}x{tiles.block_k} ({tiles.source}), its recomputing backward "
                "in the transposed scan"))
            self.count += 1
            by_a[pair.a], by_b[pair.b] = pair, pair
        return by_a, by_b

    def loop_plan(self, ordinal: int | None, trips: int) -> LoopPlan | None:
        """The plan's `ordinal`-th top-level `while` op as a loop, if it is planned as one with
        `trips` iterations."""
        plan = self.plan
        if plan is None or ordinal is None:
            return None
        whiles = [o.id for o in sorted(plan.ops, key=lambda o: o.step)
                  if o.kind == "stablehlo.while"]
        if ordinal >= len(whiles):
            return None
        loop = next((x for x in plan.loops if x.op_id == whiles[ordinal]), None)
        if loop is None or loop.trips != trips:
            return None
        return loop

    def _scan(self, eqn: Any, invals: list[Any], ordinal: int | None = None) -> list[Any]:
        params = eqn.params
        body = inline_calls(params["jaxpr"])
        if not self.matches(body.jaxpr, body.consts):
            return bind_eqn(eqn, invals)
        nc, nk = params["num_consts"], params["num_carry"]
        consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        loop = self.loop_plan(ordinal, int(params["length"]))
        body_plan = loop.body if loop is not None else None
        outer_plan, outer_where = self.plan, self.where
        where = f"loop {loop.op_id}'s body" if loop is not None else outer_where

        def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
            # The body is traced now, under its own plan (its attention groups count the body's
            # top-level dot_general ops, as the body program does).
            self.plan = body_plan if body_plan is not None else outer_plan
            self.where = where
            try:
                outs = self.run(body.jaxpr, body.consts, [*consts, *carry, *x],
                                top=body_plan is not None)
            finally:
                self.plan, self.where = outer_plan, outer_where
            return outs[:nk], outs[nk:]

        carry, ys = lax.scan(step, list(init), list(xs), length=params["length"],
                             reverse=params["reverse"], unroll=params["unroll"])
        return [*carry, *ys]

"""The plan's recomputations in the applied program: the equations run again before the read.

The applied program rewrites the jaxpr jax.grad already wrote, so `jax.checkpoint` (which acts
before differentiation) cannot be placed around the forward any more; the rewriter does what
`jax.checkpoint(prevent_cse=True)` lowers to instead. For each `Plan.recomputes` entry:

- the equations that compute the tensor's chain are found through the plan-to-jaxpr tensor map
  (offload.py's `tensor_map`: the equation of each repeated op's original);
- before the equation the plan's recomputation step maps to (the first read of the copy), the
  chain's inputs go through `lax.optimization_barrier` together with an operand of that
  equation, so XLA neither merges the repeated equations with the originals (CSE) nor hoists
  them before the read; the equations run again on the barrier's outputs;
- from there on every read of the tensor reads the recomputed value, so the original is dead
  after its last forward read and XLA frees it.

Not applied, with the reason: a tensor the map does not reach, a chain whose equations read a
value the plan's recomputation does not read (it would keep that value alive), a chain that
meets an equation the rewriter replaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jax import lax
from jax.extend import core as jcore

from tiermap.apply.jaxpr import bind_eqn, is_literal
from tiermap.apply.offload import TensorMap
from tiermap.ir.decisions import Decision
from tiermap.ir.plan import Plan
from tiermap.ir.recompute import Recompute


@dataclass(frozen=True)
class Rerun:
    """One recomputation as the rewriter runs it: before equation `at`, `eqns` again (in order)
    on `inputs` (their values behind a barrier), the result `var` replacing the original."""

    tensor: str
    at: int
    eqns: tuple[int, ...]
    inputs: tuple[Any, ...]
    var: Any


class RecomputeRun:
    """`fire(idx, env, jaxpr)` before each top-level equation; `decisions()` at the end."""

    def __init__(self, reruns: Sequence[Rerun], decisions: Sequence[Decision]) -> None:
        self.by_eqn: dict[int, list[Rerun]] = {}
        for r in reruns:
            self.by_eqn.setdefault(r.at, []).append(r)
        self._decisions = list(decisions)
        self.done: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.pending = {r.tensor: r for r in reruns}
        self._producer: tuple[Any, dict[Any, int]] | None = None
        self._vars = {r.var for r in reruns}

    def fire(self, idx: int, env: dict[Any, Any], jaxpr: Any, skip: set[int],
             read: Callable[[Any], Any] | None = None) -> None:
        """Run the recomputations due before equation `idx`; `read` gives an input's value in
        device memory (the offload run's, which copies back what the plan holds in host)."""
        for r in self.by_eqn.get(idx, ()):
            if any(e in skip for e in r.eqns):
                self.failed[r.tensor] = ("its equations are inside a region the rewriter "
                                         "replaces by a kernel")
                continue
            missing = [v for v in r.inputs if v not in env]
            if missing:
                self.failed[r.tensor] = f"an input ({missing[0]}) has no value at equation {idx}"
                continue
            dep = self._latest(jaxpr, idx, env, r.var)
            vals = [read(v) if read is not None else env[v] for v in r.inputs]
            held, _ = lax.optimization_barrier((vals, dep))
            local = dict(zip(r.inputs, held, strict=True))
            for e in r.eqns:
                eqn = jaxpr.eqns[e]
                outs = bind_eqn(eqn, [v.val if is_literal(v) else local[v] for v in eqn.invars])
                for v, o in zip(eqn.outvars, outs, strict=True):
                    if not isinstance(v, jcore.DropVar):
                        local[v] = o
            env[r.var] = local[r.var]
            self.done[r.tensor] = (f"equations {', '.join(str(e) for e in r.eqns)} run again "
                                   f"before equation {idx}, behind an optimization_barrier")

    def replaces_any(self, variables: Sequence[Any]) -> bool:
        """Whether a recomputation replaces any of these jaxpr variables."""
        return any(not is_literal(v) and v in self._vars for v in variables)

    def _latest(self, jaxpr: Any, idx: int, env: dict[Any, Any], var: Any) -> list[Any]:
        """The value the recomputation waits for: of the read's operands (other than the
        tensor), the one computed last; else what the equation before it computed."""
        if self._producer is None or self._producer[0] is not jaxpr:
            self._producer = (jaxpr, {v: i for i, e in enumerate(jaxpr.eqns)
                                      for v in e.outvars if not isinstance(v, jcore.DropVar)})
        made = self._producer[1]
        reader = jaxpr.eqns[idx].invars if idx < len(jaxpr.eqns) else []
        found = [(made[v], n) for n, v in enumerate(reader)
                 if not is_literal(v) and v is not var and v in env and v in made]
        if found:
            return [env[reader[max(found)[1]]]]
        before = [v for v in (jaxpr.eqns[idx - 1].outvars if 0 < idx <= len(jaxpr.eqns) else [])
                  if not isinstance(v, jcore.DropVar) and v in env]
        return [env[before[0]]] if before else []

    def decisions(self) -> list[Decision]:
        out = list(self._decisions)
        for tid in self.pending:
            if tid in self.done:
                out.append(Decision("recompute", tid, True, self.done[tid]))
            else:
                out.append(Decision("recompute", tid, False, "not applied: " + self.failed.get(
                    tid, "the rewriter never reached its step")))
        return out


def recompute_run(plan: Plan | None, jaxpr: Any, tmap: TensorMap | None) -> RecomputeRun | None:
    """The plan's recomputations mapped onto `jaxpr`; None if the plan has none."""
    if plan is None or not plan.recomputes:
        return None
    reruns: list[Rerun] = []
    decisions: list[Decision] = []
    for rc in plan.recomputes:
        found = _map(rc, plan, jaxpr, tmap)
        if isinstance(found, str):
            decisions.append(Decision("recompute", rc.tensor, False, "not applied: " + found))
        else:
            reruns.append(found)
    return RecomputeRun(reruns, decisions)


def _var(jaxpr: Any, where: tuple[int, int]) -> Any:
    idx, pos = where
    return jaxpr.invars[pos] if idx < 0 else jaxpr.eqns[idx].outvars[pos]


def _map(rc: Recompute, plan: Plan, jaxpr: Any, tmap: TensorMap | None) -> Rerun | str:
    if tmap is None or tmap.failure:
        return tmap.failure if tmap is not None else "no map from the plan to the jaxpr"
    ops = {o.id: o for o in plan.ops}
    if rc.tensor not in tmap.where:
        return tmap.why_not.get(rc.tensor, "the tensor maps to no jaxpr variable")
    var = _var(jaxpr, tmap.where[rc.tensor])
    eqns = sorted({tmap.where[v][0] for oid in rc.of_ops for v in ops[oid].outputs
                   if v in tmap.where and tmap.where[v][0] >= 0})
    if not eqns or tmap.where[rc.tensor][0] not in eqns:
        return "its ops map to no jaxpr equation"
    made = {v for e in eqns for v in jaxpr.eqns[e].outvars}
    inputs = list(dict.fromkeys(v for e in eqns for v in jaxpr.eqns[e].invars
                                if not is_literal(v) and v not in made))
    # The chain may read only what the plan's recomputation reads (else it would keep another
    # value alive): the jaxpr variables of its inputs, or of the originals of their copies.
    origin = {r.copy: r.tensor for r in plan.recomputes}
    allowed = {_var(jaxpr, tmap.where[t]) for u in rc.inputs
               for t in (u, origin.get(u, u)) if t in tmap.where}
    extra = [v for v in inputs if v not in allowed]
    if extra:
        return (f"its equations read a value ({extra[0]}) that the plan's recomputation does "
                f"not read (from {', '.join(rc.inputs) or 'nothing'})")
    at = tmap.eqn_at(rc.step)
    if at <= eqns[-1]:
        return f"its step maps to equation {at}, not after the equations it repeats"
    return Rerun(rc.tensor, at, tuple(eqns), tuple(inputs), var)

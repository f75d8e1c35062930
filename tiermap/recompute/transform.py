"""The program with the chosen recomputations written in: repeated ops before the reads.

For each chosen candidate the ops of its chain are repeated, in order, just before the op at
its `at_step`; their outputs are new tensors ("<id>~rc<k>"), the last one the copy of the
dropped tensor, and from that op on every read of the tensor reads the copy (and a repeated op
reads the copies made before it). Ops are renumbered by their new steps ("op<step>", nested ids
with them); `Program.recomputes` describes each recomputation in the new numbering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tiermap.ir.program import Op, Program, Value
from tiermap.ir.recompute import RECOMPUTE_OF_ATTR, Recompute
from tiermap.recompute.select import Candidate, describe


def _renamed(op: Op, new_id: str, step: int) -> Op:
    """`op` under a new id at a new step, the ids of its nested body ops following."""
    if op.id == new_id and op.step == step:
        return op
    prefix = op.id + "."

    def rebody(sub: Op) -> Op:
        sid = new_id + "." + sub.id[len(prefix):] if sub.id.startswith(prefix) else sub.id
        return replace(sub, id=sid, body=tuple(rebody(b) for b in sub.body))

    return replace(op, id=new_id, step=step, body=tuple(rebody(b) for b in op.body))


def rewrite(program: Program, chosen: Sequence[Candidate]) -> Program:
    """`program` with `chosen` recomputed (module docstring)."""
    if not chosen:
        return program
    at: dict[int, list[Candidate]] = {}
    for c in chosen:
        at.setdefault(c.at_step, []).append(c)
    new_step = {}
    step = 0
    for s in range(program.num_steps):
        step += sum(len(c.chain) for c in at.get(s, ()))
        new_step[s] = step
        step += 1
    current: dict[str, str] = {}  # tensor -> the copy its reads read now
    ops: list[Op] = []
    values: dict[str, Value] = {
        vid: replace(v, producer_step=new_step[v.producer_step]) if v.producer_step >= 0 else v
        for vid, v in program.values.items()}
    records: list[Recompute] = []
    serial = 0
    for s, op in enumerate(program.ops):
        for c in sorted(at.get(s, ()), key=lambda c: program.values[c.tensor].producer_step):
            first = len(ops)
            local: dict[str, str] = {}
            ids: list[str] = []
            for p in c.chain:
                orig = program.ops[p]
                outs = []
                for out in orig.outputs:
                    serial += 1
                    copy = f"{out}~rc{serial}"
                    values[copy] = Value(copy, program.values[out].type, len(ops))
                    local[out] = copy
                    outs.append(copy)
                ins = tuple(local.get(u, current.get(u, u)) for u in orig.inputs)
                oid = f"op{len(ops)}"
                ids.append(oid)
                ops.append(replace(_renamed(orig, oid, len(ops)), inputs=ins,
                                   outputs=tuple(outs),
                                   attrs={**orig.attrs, RECOMPUTE_OF_ATTR: f"op{new_step[p]}"}))
            current[c.tensor] = local[c.tensor]
            records.append(Recompute(
                tensor=c.tensor, copy=local[c.tensor], step=first, op_ids=tuple(ids),
                of_ops=tuple(f"op{new_step[p]}" for p in c.chain),
                inputs=tuple(current.get(u, u) for u in c.inputs), nbytes=c.nbytes,
                freed_steps=(new_step[c.idle[0]], new_step[c.idle[1]]), time_s=c.time_s,
                reason=describe(c, program)))
        n = len(ops)
        ops.append(replace(_renamed(op, f"op{n}", n),
                           inputs=tuple(current.get(u, u) for u in op.inputs)))
    outputs = tuple(current.get(u, u) for u in program.outputs)
    return replace(program, ops=tuple(ops), values=values, outputs=outputs,
                   recomputes=program.recomputes + tuple(records))

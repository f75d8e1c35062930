"""A `while` loop's body as a program of its own: `loop_body(program, op)`.

Every pass plans a loop by planning its body once, as a steady-state iteration (a modulo
schedule): the body becomes a `Program` whose inputs are what one iteration reads and whose
outputs are what it leaves behind, and the loop costs prologue + trips × iteration + epilogue.

Each operand of the `while` (each loop-carried position `j`: operand, body argument, body result)
has one role:

- "counter": the induction variable (`i = c0; i < c1; i += c2`, as lax.scan and fori_loop emit);
- "xs": a stack the body reads one slice of per iteration (`dynamic_slice(stack, f(i), 0, ...)`
  with a leading slice of 1, as lax.scan reads its `xs` and jax.grad's transposed scan reads the
  stacked residuals): in the body the slice is an input, and the stack stays outside, streamed in
  slice by slice;
- "ys": a stack the body writes one slice of per iteration (`dynamic_update_slice(stack, y, f(i),
  0, ...)`, lax.scan's `ys`): in the body the slice is an output, streamed out;
- "invariant": passed through unchanged (weights the body reads whole, the xs of a loop that
  reads them otherwise); an input of the body;
- "carry": anything else (the loop state); an input and an output of the body, which must meet
  across the back edge.

Values the body reads from outside the loop (implicit captures) are inputs too. Body ops are
renumbered `op0..` in the body program (`LoopBody.source_op_ids` maps them back); their nested
bodies are renumbered with them, so a loop inside a body is a loop of the body program.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from tiermap.ir.program import CONSTANT_KIND, Op, Program, Value

ROLES = ("counter", "xs", "ys", "invariant", "carry")

# Scalar integer ops that derive a slice index from the counter (e.g. n - 1 - i for a reversed
# scan, or i * 2 + 1).
_INDEX_KINDS = frozenset({
    "stablehlo.add", "stablehlo.subtract", "stablehlo.multiply", "stablehlo.divide",
    "stablehlo.remainder", "stablehlo.convert", "stablehlo.select", "stablehlo.compare",
    "stablehlo.clamp", "stablehlo.maximum", "stablehlo.minimum", "stablehlo.negate",
    "stablehlo.reshape", "stablehlo.broadcast_in_dim",
})


@dataclass(frozen=True)
class LoopBody:
    """One `while` op's body as a program, and how it connects to the loop's operands.

    Attributes:
        op_id: the `while` op in the enclosing program.
        trips: iterations: the static trip count, or the assumed one when `static_trips` is False.
        static_trips: whether the trip count was read from the program.
        roles: the role of each loop operand (one of ROLES), in operand order.
        program: the body as a program (one iteration).
        operand_inputs: loop operand index → the body input it becomes (absent for "ys"; for
            "xs" the slice read in the iteration, the first one when it is sliced more than
            once).
        slice_inputs: body input id → loop operand index, for every xs slice.
        operand_outputs: loop operand index → the body output that leaves it ("carry",
            "counter": the next value; "ys": the slice written).
        captured: body inputs that are values of the enclosing program read directly.
        source_op_ids: body op id ("op3") → the op's id in the enclosing program ("op2.r1.5").
        recomputed_stacks: loop operand indices of xs/ys stacks that are not stored: residuals
            of an attention whose forward runs in one loop and whose backward, recomputing them,
            in another (tiermap/loop_planning.py pairs them); empty as cut out.
    """

    op_id: str
    trips: int
    static_trips: bool
    roles: tuple[str, ...]
    program: Program
    operand_inputs: Mapping[int, str]
    slice_inputs: Mapping[str, int]
    operand_outputs: Mapping[int, str]
    captured: tuple[str, ...]
    source_op_ids: Mapping[str, str]
    recomputed_stacks: frozenset[int] = frozenset()

    def positions(self, role: str) -> tuple[int, ...]:
        return tuple(j for j, r in enumerate(self.roles) if r == role)


def renumber(op: Op, new_id: str, step: int) -> Op:
    """`op` as `new_id` at `step`, its nested body ops renamed under the new id."""
    old = op.id
    body = tuple(_rename(sub, old, new_id) for sub in op.body)
    return replace(op, id=new_id, step=step, body=body)


def _rename(op: Op, old: str, new: str) -> Op:
    return replace(op, id=new + op.id[len(old):],
                   body=tuple(_rename(sub, old, new) for sub in op.body))


def _region_ops(op: Op, region: int) -> list[Op]:
    prefix = f"{op.id}.r{region}."
    return [sub for sub in op.body if sub.id.startswith(prefix) and "." not in
            sub.id[len(prefix):]]


def loop_body(program: Program, op: Op, assumed_trips: int = 1) -> LoopBody | None:
    """The body of the `while` op `op` of `program` as a program, or None when `op` is not a
    `while` with the cond/body shape the frontend records (then it stays one opaque op).

    `assumed_trips` is the trip count of a loop whose bound is not static."""
    if op.kind != "stablehlo.while" or "region_results" not in op.attrs:
        return None
    region_args = op.attrs["region_args"]
    region_results = op.attrs["region_results"]
    if len(region_args) != 2 or len(region_results) != 2:
        return None
    args = tuple(region_args[1])
    results = tuple(region_results[1])
    num_operands = int(op.attrs.get("num_operands", len(op.inputs)))
    if len(args) != num_operands or len(results) != num_operands:
        return None
    every: dict[str, Value] = {**program.body_values, **program.values}
    ops = _region_ops(op, 1)
    static = bool(op.attrs.get("static_trips", op.trip_count > 1))
    trips = op.trip_count if static else max(int(assumed_trips), 1)

    producer = {vid: o for o in ops for vid in o.outputs}
    readers: dict[str, list[Op]] = {}
    for o in ops:
        for vid in o.inputs:
            readers.setdefault(vid, []).append(o)

    def is_const(vid: str) -> bool:
        p = producer.get(vid)
        return p is not None and p.kind == CONSTANT_KIND

    counter = None
    for j, (a, r) in enumerate(zip(args, results, strict=True)):
        p = producer.get(r)
        t = every[a].type
        if (p is not None and p.kind == "stablehlo.add" and t.shape == () and
                t.dtype.startswith(("i", "ui")) and a in p.inputs and
                all(v == a or is_const(v) for v in p.inputs)):
            counter = j
            break
    # Index values: derived from the counter and constants only.
    index: set[str] = set()
    if counter is not None:
        index.add(args[counter])
        for o in ops:
            if (o.kind in _INDEX_KINDS and all(every[v].shape == () for v in o.outputs) and
                    o.inputs and all(v in index or is_const(v) for v in o.inputs)):
                index.update(o.outputs)

    def leading_slice(o: Op, stack: str, piece: str, starts: tuple[str, ...]) -> bool:
        st, pt = every[stack].shape, every[piece].shape
        return (len(st) >= 1 and len(pt) == len(st) and pt[0] == 1 and pt[1:] == st[1:] and
                bool(starts) and starts[0] in index and all(is_const(v) for v in starts[1:]))

    roles: list[str] = []
    dropped: set[str] = set()
    slice_inputs: dict[str, int] = {}
    operand_inputs: dict[int, str] = {}
    operand_outputs: dict[int, str] = {}
    for j, (a, r) in enumerate(zip(args, results, strict=True)):
        users = readers.get(a, [])
        if j == counter:
            roles.append("counter")
            operand_inputs[j] = a
            operand_outputs[j] = r
        elif r == a and users and all(
                u.kind == "stablehlo.dynamic_slice" and u.inputs[0] == a and a not in u.inputs[1:]
                and leading_slice(u, a, u.outputs[0], u.inputs[1:]) for u in users):
            roles.append("xs")
            for u in users:
                dropped.add(u.id)
                slice_inputs[u.outputs[0]] = j
            operand_inputs[j] = users[0].outputs[0]
        elif (r != a and (p := producer.get(r)) is not None and
              p.kind == "stablehlo.dynamic_update_slice" and p.inputs[0] == a and
              [u.id for u in users] == [p.id] and a not in p.inputs[1:] and
              leading_slice(p, a, p.inputs[1], p.inputs[2:]) and
              p.inputs[1] not in index):
            roles.append("ys")
            dropped.add(p.id)
            operand_outputs[j] = p.inputs[1]
        elif r == a:
            roles.append("invariant")
            operand_inputs[j] = a
        else:
            roles.append("carry")
            operand_inputs[j] = a
            operand_outputs[j] = r
    kept = [o for o in ops if o.id not in dropped]
    defined = {vid for o in kept for vid in o.outputs}
    inputs: list[str] = []
    for j in range(num_operands):
        if roles[j] == "xs":
            inputs.extend(s for s, k in slice_inputs.items() if k == j)
        elif j in operand_inputs:
            inputs.append(operand_inputs[j])
    captured: list[str] = []
    for o in kept:
        for vid in o.inputs:
            if vid not in defined and vid not in inputs and vid not in captured:
                captured.append(vid)
    for vid in operand_outputs.values():  # an output that no kept op defines
        if vid not in defined and vid not in inputs and vid not in captured:
            captured.append(vid)
    inputs.extend(captured)
    outputs = tuple(operand_outputs[j] for j in range(num_operands) if j in operand_outputs)
    renamed: list[Op] = []
    source: dict[str, str] = {}
    values: dict[str, Value] = {vid: replace(every[vid], producer_step=-1) for vid in inputs}
    for step, o in enumerate(kept):
        new = renumber(o, f"op{step}", step)
        renamed.append(new)
        source[new.id] = o.id
        for vid in o.outputs:
            values[vid] = replace(every[vid], producer_step=step)
    body_values = {vid: v for vid, v in program.body_values.items() if vid not in values}
    name = f"{program.name}.{op.id}"
    body = Program(name=name, ops=tuple(renamed), values=values, inputs=tuple(inputs),
                   outputs=outputs, platform=program.platform,
                   assumptions=(f"loop body of {op.id} ({trips} trips"
                                f"{'' if static else ', assumed'})",),
                   body_values=body_values)
    return LoopBody(op_id=op.id, trips=trips, static_trips=static, roles=tuple(roles),
                    program=body, operand_inputs=operand_inputs, slice_inputs=slice_inputs,
                    operand_outputs=operand_outputs, captured=tuple(captured),
                    source_op_ids=source)

"""Roofline costs of ops, fused kernels and transfers on a target.

The model (docs/architecture.md, "Cost model"; tiermap/ir/plan.py fixes the time semantics):

- An op or fused kernel takes `max(compute_s, memory_s) + target.op_overhead_s`, where
  `memory_s = Σ_tier (bytes_read_tier / read_bytes_per_s + bytes_written_tier / write_bytes_per_s)`.
- `compute_s = (flops + transcendental_flops · transcendentals) / rate`, where `rate` is
  - for contractions (dot, convolution), which run on the matrix units: `target.peak(dtype)`;
  - for every other op, which runs as vector loop code: `min(peak(dtype), peak("f32"))` (low-
    precision peaks are matrix-unit figures) times the platform's `vector_peak_fraction`;
  - times `units_used / units`: an op with fewer than `units × parallel_grain_elements` elements
    of work does not keep every core busy (contractions are split over output elements, loops
    over the elements they read or write).
- These figures are the target's own ([compute] keys `vector_peak_fraction`,
  `transcendental_flops`, `parallel_grain_elements`; defaults 1, 1, 0 fit accelerators), not
  the lowering platform's: sn40l and stm32f746 lower for "cpu" but compute like themselves.
  `CPU_MEASURED` holds the figures measured with benchmarks/costmodel_cpu.py (docs/benchmarks.md)
  that the built-in `cpu` target and `tiermap calibrate` carry: XLA's CPU loop code retires about
  one elementwise flop per 20 flops of the FMA matmul peak, a transcendental costs about 4 such
  flops, and small matmuls run on one core.
- An op reads each operand whole, except partial readers: slice, dynamic_slice and gather read
  from operand 0 only as many bytes as they write; dynamic_update_slice reads the update, not the
  buffer it updates in place. Per-operand bytes are scaled so they sum to `op.bytes_read`.
- A fused kernel reads each external input once (times the group's `reads_per_input`), writes each
  materialized output once, and moves nothing for its internal tensors; it pays one overhead.
- A transfer takes bytes / `target.link_bytes_per_s(src, dst)`.
- A target with `[compute] working_set_tiers = true` (a calibrated CPU) has its kernels' memory
  time charged at the tier their working set fits in, contractions at the calibrated matmul rate
  for their size and transcendentals at their measured rates: costmodel/working_set.py.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiermap.costmodel import working_set
from tiermap.costmodel.cost import Cost
from tiermap.errors import TiermapError
from tiermap.ir.program import DTYPE_BITS, Op, Program, Value

if TYPE_CHECKING:
    from tiermap.hardware.target import Target
    from tiermap.ir.fusion import Fusion, FusionGroup



@dataclass(frozen=True)
class PlatformModel:
    """How ops use a platform's compute, beyond its peak FLOP/s.

    Attributes:
        transcendental_flops: flops charged per transcendental (exp, log, tanh ...).
        vector_peak_fraction: fraction of the f32 peak that non-contraction (loop) code reaches.
        parallel_grain_elements: elements of work one unit needs before another unit joins in;
            0 means every op keeps all units busy.
    """

    transcendental_flops: float = 1.0
    vector_peak_fraction: float = 1.0
    parallel_grain_elements: float = 0.0


# Accelerators: special-function units make a transcendental about one flop; the f32 figure is the
# vector peak already (the defaults). XLA's CPU backend: measured on a 2-core AVX-512 VM
# (docs/benchmarks.md); the built-in `cpu` target and `tiermap calibrate` carry these figures.
CPU_MEASURED = PlatformModel(transcendental_flops=4.0, vector_peak_fraction=0.05,
                             parallel_grain_elements=50_000.0)

# Ops that read only part of operand 0 (as many bytes as they write).
PARTIAL_READERS = frozenset({
    "stablehlo.slice", "stablehlo.dynamic_slice", "stablehlo.real_dynamic_slice",
    "stablehlo.gather",
})
# Ops that run on matrix units and so reach the dtype's full peak.
CONTRACTIONS = frozenset({"stablehlo.dot_general", "stablehlo.dot", "stablehlo.convolution"})


# --- compute ------------------------------------------------------------------------------------


def platform_model(target: Target) -> PlatformModel:
    """How ops use `target`'s compute, from its optional [compute] keys."""
    return PlatformModel(
        transcendental_flops=target.transcendental_flops,
        vector_peak_fraction=target.vector_peak_fraction,
        parallel_grain_elements=target.parallel_grain_elements,
    )


def transcendental_flops(target: Target) -> float:
    """Flops charged for one transcendental on `target`."""
    return platform_model(target).transcendental_flops


def peak_flops_per_s(op: Op, target: Target) -> float:
    """The rate `op` computes at on all units: the dtype peak for contractions, else the vector
    rate (at most the f32 peak, times the platform's vector_peak_fraction)."""
    peak = target.peak(op.dtype)
    if op.kind in CONTRACTIONS:
        return peak
    if "f32" in target.peak_flops_per_s:
        peak = min(peak, target.peak_flops_per_s["f32"])
    return peak * platform_model(target).vector_peak_fraction


def work_elements(op: Op) -> float:
    """Elements an op's work splits over: output elements of a contraction (batch·m·n, or
    n·out_spatial·cout), else the larger of the elements it reads and writes."""
    a = op.attrs
    if op.kind in ("stablehlo.dot_general", "stablehlo.dot") and "m" in a and "n" in a:
        return float(a.get("batch", 1)) * float(a["m"]) * float(a["n"])
    if op.kind == "stablehlo.convolution" and "out_spatial" in a and "cout" in a:
        return float(a.get("n", 1)) * float(a["out_spatial"]) * float(a["cout"])
    elem_bytes = max(DTYPE_BITS.get(op.dtype, 32), 8) / 8
    return max(op.bytes_read, op.bytes_written) / elem_bytes


def units_used(op: Op, target: Target) -> float:
    """How many of the target's units `op` keeps busy: work / grain, between 1 and all."""
    grain = platform_model(target).parallel_grain_elements
    units = max(target.units, 1)
    if grain <= 0.0 or units == 1:
        return float(units)
    return min(float(units), max(1.0, work_elements(op) / grain))


def op_flops(op: Op, target: Target) -> float:
    """The op's flops with transcendentals at their flop equivalent on `target`."""
    return op.flops + transcendental_flops(target) * op.transcendentals


# Op attributes set on a `while` whose body is planned (tiermap/loop_planning.py): the loop's
# planned time and its lower bound stand for the op's compute.
LOOP_TIME_ATTR = "loop_time_s"
LOOP_LOWER_BOUND_ATTR = "loop_lower_bound_s"
# ... and the bytes it moves of each operand and result: the stacks streamed slice by slice
# (every other operand moves in the loop's prologue and epilogue, inside its time).
LOOP_OPERAND_BYTES_ATTR = "loop_operand_bytes"
LOOP_RESULT_BYTES_ATTR = "loop_result_bytes"
# ... and, tier → bytes, what its body holds while it runs beyond the enclosing plan's tensors
# (`LoopPlan.reserved_bytes`): placement leaves that much of each tier free at the op's step.
LOOP_RESERVED_ATTR = "loop_reserved_bytes"


def compute_time_s(op: Op, target: Target) -> float:
    """Seconds of compute: flop equivalent / (rate × units used / units); 0 for data movement.

    A `while` whose body is planned computes for the loop's planned time (`LOOP_TIME_ATTR`)."""
    planned = op.attrs.get(LOOP_TIME_ATTR)
    if planned is not None:
        return float(planned)
    flops = op_flops(op, target)
    if flops <= 0.0:
        return 0.0
    peak = peak_flops_per_s(op, target)
    if working_set.applies(target) and peak > 0.0:
        return working_set.compute_time_s(op, target, peak,
                                          units_used(op, target) / max(target.units, 1),
                                          work_elements(op))
    if peak <= 0.0:
        raise TiermapError(
            f"target '{target.name}' has peak {peak} FLOP/s for dtype {op.dtype} ({op.id}); "
            "fix: give [compute] peak_flops_per_s a positive figure for it")
    return flops / (peak * units_used(op, target) / max(target.units, 1))


def compute_lower_bound_s(op: Op, target: Target) -> float:
    """What no plan's compute time for `op` can beat: `compute_time_s`, or for a planned loop
    the loop's lower bound (trips × its body's)."""
    bound = op.attrs.get(LOOP_LOWER_BOUND_ATTR)
    if bound is not None:
        return float(bound)
    return compute_time_s(op, target)


# --- bytes --------------------------------------------------------------------------------------


def _value(program: Program, vid: str) -> Value:
    v = program.values.get(vid)
    if v is None:
        v = program.body_values[vid]
    return v


def _scale_to(raw: Sequence[int], total: int) -> list[int]:
    """Integers proportional to `raw` that sum to `total` exactly (largest remainder)."""
    n = len(raw)
    if n == 0:
        return []
    s = sum(raw)
    if s == total:
        return list(raw)
    if total <= 0:
        return [0] * n
    if s <= 0:
        base, extra = divmod(total, n)
        return [base + (1 if i < extra else 0) for i in range(n)]
    out = [r * total // s for r in raw]
    left = total - sum(out)
    order = sorted(range(n), key=lambda i: (-((raw[i] * total) % s), i))
    for i in order[:left]:
        out[i] += 1
    return out


def operand_read_bytes(op: Op, program: Program) -> list[int]:
    """Bytes `op` reads of each input, in input order; they sum to `op.bytes_read`.

    Whole operands, except that slice/dynamic_slice/gather read from operand 0 only as many bytes
    as they write, and dynamic_update_slice reads the update rather than the buffer it updates.
    """
    planned = op.attrs.get(LOOP_OPERAND_BYTES_ATTR)
    if planned is not None:
        return [int(b) for b in planned]
    raw = [_value(program, vid).nbytes for vid in op.inputs]
    if raw and op.kind in PARTIAL_READERS:
        written = sum(_value(program, vid).nbytes for vid in op.outputs)
        raw[0] = min(raw[0], written)
    elif raw and op.kind == "stablehlo.dynamic_update_slice":
        raw[0] = 0
    return _scale_to(raw, op.bytes_read)


def result_write_bytes(op: Op, program: Program) -> list[int]:
    """Bytes `op` writes of each output, in output order; they sum to `op.bytes_written`."""
    planned = op.attrs.get(LOOP_RESULT_BYTES_ATTR)
    if planned is not None:
        return [int(b) for b in planned]
    raw = [_value(program, vid).nbytes for vid in op.outputs]
    return _scale_to(raw, op.bytes_written)


# --- one op -------------------------------------------------------------------------------------


def memory_time_s(read_bytes_by_tier: Mapping[str, float],
                  write_bytes_by_tier: Mapping[str, float], target: Target) -> float:
    """Σ_tier bytes read / read bandwidth + bytes written / write bandwidth."""
    total_s = 0.0
    for tier, nbytes in read_bytes_by_tier.items():
        if nbytes:
            total_s += nbytes / target.tier(tier).read_bytes_per_s
    for tier, nbytes in write_bytes_by_tier.items():
        if nbytes:
            total_s += nbytes / target.tier(tier).write_bytes_per_s
    return total_s


def _cost(flops_by_dtype: dict[str, float], reads: dict[str, float], writes: dict[str, float],
          compute_s: float, target: Target, fresh_write_bytes: float = 0.0) -> Cost:
    if working_set.applies(target):
        mem_s = working_set.memory_time_s(reads, writes, target, fresh_write_bytes)
    else:
        mem_s = memory_time_s(reads, writes, target)
    moved = dict(reads)
    for tier, nbytes in writes.items():
        moved[tier] = moved.get(tier, 0.0) + nbytes
    return Cost(flops_by_dtype, moved, max(compute_s, mem_s) + target.op_overhead_s)


def op_cost(op: Op, program: Program, target: Target, input_tiers: Sequence[str],
            output_tiers: Sequence[str]) -> Cost:
    """Roofline cost of `op` run alone, reading input i from `input_tiers[i]` and writing output j
    to `output_tiers[j]`."""
    if len(input_tiers) != len(op.inputs) or len(output_tiers) != len(op.outputs):
        raise TiermapError(
            f"{op.id} ({op.kind}) has {len(op.inputs)} inputs and {len(op.outputs)} outputs, "
            f"but {len(input_tiers)} input tiers and {len(output_tiers)} output tiers were given")
    reads: dict[str, float] = {}
    writes: dict[str, float] = {}
    for tier, nbytes in zip(input_tiers, operand_read_bytes(op, program), strict=True):
        reads[tier] = reads.get(tier, 0.0) + nbytes
    written = list(zip(output_tiers, map(float, result_write_bytes(op, program)), strict=True))
    for tier, out_bytes in written:
        writes[tier] = writes.get(tier, 0.0) + out_bytes
    flops = op_flops(op, target)
    fresh = working_set.first_touch_bytes(written, target) if working_set.applies(target) else 0.0
    return _cost({op.dtype: flops} if flops else {}, reads, writes, compute_time_s(op, target),
                 target, fresh)


# --- kernels ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelIO:
    """What one kernel (a fusion group or a lone op) moves between memory and the cores.

    Attributes:
        group_id: the fusion group's id, None for a lone op.
        steps: the steps of its ops, ascending.
        reads: (tensor id, step of the reading op, bytes) per read from memory.
        writes: (tensor id, producer step, bytes) per write to memory.
    """

    group_id: str | None
    steps: tuple[int, ...]
    reads: tuple[tuple[str, int, float], ...]
    writes: tuple[tuple[str, int, float], ...]


def op_io(op: Op, program: Program) -> KernelIO:
    """The reads and writes of `op` run alone (one entry per operand and result)."""
    reads = tuple((vid, op.step, float(b))
                  for vid, b in zip(op.inputs, operand_read_bytes(op, program), strict=True))
    writes = tuple((vid, op.step, float(b))
                   for vid, b in zip(op.outputs, result_write_bytes(op, program), strict=True))
    return KernelIO(None, (op.step,), reads, writes)


def group_io(group: FusionGroup, program: Program) -> KernelIO:
    """The reads and writes of a fused kernel: external inputs and materialized outputs, once.

    An external input is read by the group's first op that reads it, as many bytes as the
    largest read any of its ops makes of it, times `group.reads_per_input` (default 1).
    """
    ops = sorted((program.op(oid) for oid in group.op_ids), key=lambda o: o.step)
    produced: set[str] = set()
    read_at: dict[str, tuple[int, float]] = {}
    writes: list[tuple[str, int, float]] = []
    for op in ops:
        for vid, b in zip(op.inputs, operand_read_bytes(op, program), strict=True):
            if vid in produced:
                continue
            step, best = read_at.get(vid, (op.step, 0.0))
            read_at[vid] = (step, max(best, float(b)))
        for vid, b in zip(op.outputs, result_write_bytes(op, program), strict=True):
            produced.add(vid)
            if vid not in group.internal:
                writes.append((vid, op.step, float(b)))
    reads = tuple((vid, step, b * float(group.reads_per_input.get(vid, 1.0)))
                  for vid, (step, b) in read_at.items())
    return KernelIO(group.id, tuple(o.step for o in ops), reads, tuple(writes))


_KERNEL_CACHE: dict[tuple[int, int], tuple[weakref.ref[Program], object, tuple[KernelIO, ...]]]
_KERNEL_CACHE = {}
_KERNEL_CACHE_SIZE = 16


def program_kernels(program: Program, fusion: Fusion | None = None) -> tuple[KernelIO, ...]:
    """Every kernel of the program in order of first step: fusion groups and lone ops.

    Cached per (program, fusion) object, since placement searches evaluate one program many times.
    """
    key = (id(program), id(fusion))
    hit = _KERNEL_CACHE.get(key)
    if hit is not None and hit[0]() is program and hit[1] is fusion:
        return hit[2]
    group_of = fusion.group_of() if fusion is not None else {}
    kernels: list[KernelIO] = []
    seen: set[str] = set()
    for op in program.ops:
        group = group_of.get(op.id)
        if group is None:
            kernels.append(op_io(op, program))
        elif group.id not in seen:
            seen.add(group.id)
            kernels.append(group_io(group, program))
    out = tuple(kernels)
    if len(_KERNEL_CACHE) >= _KERNEL_CACHE_SIZE:
        _KERNEL_CACHE.pop(next(iter(_KERNEL_CACHE)))
    _KERNEL_CACHE[key] = (weakref.ref(program), fusion, out)
    return out


def group_cost(group: FusionGroup, program: Program, target: Target,
               tier_of: Mapping[str, str]) -> Cost:
    """Roofline cost of a fused kernel whose external tensors live in `tier_of[tensor id]`.

    compute = Σ of its ops' compute; bytes = external inputs × reads_per_input + materialized
    outputs; internal tensors move nothing; one `op_overhead_s`.
    """
    io = group_io(group, program)
    reads: dict[str, float] = {}
    writes: dict[str, float] = {}
    for side, entries in ((reads, io.reads), (writes, io.writes)):
        for vid, _step, nbytes in entries:
            tier = tier_of.get(vid)
            if tier is None:
                raise TiermapError(
                    f"fusion group '{group.id}': no tier given for tensor {vid}; "
                    "fix: put every external input and materialized output in tier_of")
            side[tier] = side.get(tier, 0.0) + nbytes
    flops: dict[str, float] = {}
    compute_s = 0.0
    for oid in group.op_ids:
        op = program.op(oid)
        f = op_flops(op, target)
        if f:
            flops[op.dtype] = flops.get(op.dtype, 0.0) + f
        compute_s += compute_time_s(op, target)
    fresh = (working_set.first_touch_bytes(((tier_of[v], b) for v, _, b in io.writes), target)
             if working_set.applies(target) else 0.0)
    return _cost(flops, reads, writes, compute_s, target, fresh)


# --- transfers ----------------------------------------------------------------------------------


def transfer_time_s(nbytes: float, src: str, dst: str, target: Target) -> float:
    """Seconds to copy `nbytes` from tier `src` to tier `dst` over their link."""
    bw = target.link_bytes_per_s(src, dst)
    if bw <= 0.0:
        raise TiermapError(
            f"target '{target.name}': link {src} -> {dst} has bandwidth {bw} B/s; "
            "fix: declare a positive [[links]] bytes_per_s for it")
    return nbytes / bw

"""IO lower bounds and tiled-kernel traffic (matmul, attention, softmax) and the program bound.

Quantities are bytes unless the name says words; a "word" is one element of `elem_bytes` bytes and
fast memory holds `M = fast_bytes // elem_bytes` words.

- Matmul (Hong & Kung 1981, sharpened by Smith et al. 2017, "A tight I/O lower bound for matrix
  multiplication"): at least 2mnk/√M + mn words, and never less than the compulsory mk + kn + mn.
  A tiled matmul with output tiles Tm × Tn moves mnk(1/Tm + 1/Tn) + mn words.
- Attention (Saha & Ye 2024, "The I/O complexity of attention"): Θ(N²d²/M) for M ≥ d² (what
  FlashAttention attains) and Θ(N²d/√M) for M < d²; we take the constant of each Θ as 1, and never
  go below the compulsory 4Nd (read Q, K, V; write O).
- Softmax over rows: three-pass reads the input 3× and writes once; two-pass (Dukhan & Ablavatski
  2020) reads 2× and writes once; inside a fused attention tile (online softmax) it moves nothing.
- `program_lower_bound_s`: a bound no plan can beat under tiermap/costmodel/evaluate.py's semantics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from tiermap.costmodel.roofline import compute_time_s, program_kernels
from tiermap.errors import TiermapError

if TYPE_CHECKING:
    from tiermap.hardware.target import Target, Tier
    from tiermap.ir.fusion import Fusion
    from tiermap.ir.program import Program

# Relative slack subtracted from the program bound so that float summation order in `evaluate`
# can never put a plan's predicted time a few ulps below it.
BOUND_ROUNDING_SLACK = 1e-9


def _positive(**quantities: float) -> None:
    bad = [f"{k}={v}" for k, v in quantities.items() if not v > 0]
    if bad:
        raise TiermapError(f"expected positive values, got {', '.join(bad)}")


def _fast_words(fast_bytes: float, elem_bytes: float) -> float:
    _positive(fast_bytes=fast_bytes, elem_bytes=elem_bytes)
    return math.floor(fast_bytes / elem_bytes)


# --- matmul -------------------------------------------------------------------------------------


def matmul_compulsory_bytes(m: int, n: int, k: int, elem_bytes: float) -> float:
    """Read A (m×k) and B (k×n) once, write C (m×n) once."""
    return float(elem_bytes) * (m * k + k * n + m * n)


def matmul_io_lower_bound_bytes(m: int, n: int, k: int, fast_bytes: float,
                                elem_bytes: float) -> float:
    """Hong–Kung/Smith et al. bound elem_bytes·(2mnk/√M + mn), at least the compulsory traffic."""
    _positive(m=m, n=n, k=k)
    words = _fast_words(fast_bytes, elem_bytes)
    if words < 1:
        raise TiermapError(f"fast memory of {fast_bytes} bytes holds no {elem_bytes}-byte word")
    bound = elem_bytes * (2.0 * m * n * k / math.sqrt(words) + m * n)
    return max(bound, matmul_compulsory_bytes(m, n, k, elem_bytes))


def tiled_matmul_traffic_bytes(m: int, n: int, k: int, tm: int, tn: int,
                               elem_bytes: float) -> float:
    """Traffic of a matmul tiled into Tm × Tn output tiles: elem_bytes·(mnk(1/Tm + 1/Tn) + mn)."""
    _positive(m=m, n=n, k=k, tm=tm, tn=tn)
    return elem_bytes * (m * n * k * (1.0 / tm + 1.0 / tn) + m * n)


# --- attention ----------------------------------------------------------------------------------


def attention_compulsory_bytes(n: int, d: int, elem_bytes: float, batch_heads: int = 1) -> float:
    """Read Q, K, V and write O once: 4Nd words per head."""
    return float(elem_bytes) * 4.0 * n * d * batch_heads


def attention_io_lower_bound_bytes(n: int, d: int, fast_bytes: float, elem_bytes: float,
                                   batch_heads: int = 1) -> float:
    """Saha & Ye's attention bound (constant 1): N²d²/M words for M ≥ d², N²d/√M below.

    Per head, times `batch_heads`; never below the compulsory 4Nd words.
    """
    _positive(n=n, d=d, batch_heads=batch_heads)
    words = _fast_words(fast_bytes, elem_bytes)
    if words < 1:
        raise TiermapError(f"fast memory of {fast_bytes} bytes holds no {elem_bytes}-byte word")
    if words >= d * d:
        per_head = float(n) * n * d * d / words
    else:
        per_head = float(n) * n * d / math.sqrt(words)
    per_head = max(per_head, 4.0 * n * d)
    return elem_bytes * per_head * batch_heads


def unfused_attention_traffic_bytes(n: int, d: int, elem_bytes: float,
                                    batch_heads: int = 1) -> float:
    """Standard attention, S = QKᵀ, P = softmax(S), O = PV each through memory: Θ(Nd + N²).

    Words per head: QKᵀ reads 2Nd and writes N²; a three-pass softmax reads 3N² and writes N²;
    PV reads N² + Nd and writes Nd.
    """
    _positive(n=n, d=d, batch_heads=batch_heads)
    per_head = 2.0 * n * d + n * n + 4.0 * n * n + n * n + 2.0 * n * d
    return elem_bytes * per_head * batch_heads


class FlashBlocks(NamedTuple):
    """FlashAttention-1 block sizes and the fast-memory words one step of the kernel needs."""

    block_r: int
    block_c: int
    working_set_words: int


def flash_attention_working_set_words(d: int, block_r: int, block_c: int) -> int:
    """Words held on chip by FlashAttention-1: K_j, V_j, Q_i (and O_i) blocks plus S_ij."""
    return (2 * block_c + block_r) * d + block_r * block_c


def flash_attention_blocks(fast_bytes: float, d: int, elem_bytes: float) -> FlashBlocks:
    """FlashAttention-1's rule: Bc = ⌈M/4d⌉, Br = min(Bc, d), M in words.

    The rounding up can overshoot M by a little; Bc is then lowered until
    (2Bc + Br)·d + Br·Bc ≤ M holds.

    Raises:
        TiermapError: fast memory cannot hold even 1×1 blocks ((3d + 1) words).
    """
    _positive(d=d)
    words = int(_fast_words(fast_bytes, elem_bytes))
    block_c = max(1, -(-words // (4 * d)))
    block_r = min(block_c, d)
    while flash_attention_working_set_words(d, block_r, block_c) > words and block_c > 1:
        block_c -= 1
        block_r = min(block_c, d)
    need = flash_attention_working_set_words(d, block_r, block_c)
    if need > words:
        raise TiermapError(
            f"fast memory of {fast_bytes} bytes ({words} words of {elem_bytes} bytes) cannot hold "
            f"one FlashAttention block for head dim {d}: needs {need} words; "
            "fix: use a larger on-chip tier or a smaller head dimension")
    return FlashBlocks(block_r, block_c, need)


def flash_attention_traffic_bytes(n: int, d: int, block_r: int, block_c: int,
                                  elem_bytes: float, batch_heads: int = 1) -> float:
    """Traffic of FlashAttention-1's forward loop order (outer loop over KV blocks).

    K and V are read once (2Nd words); for each of the Tc = ⌈N/Bc⌉ KV blocks every Q_i is read, and
    O_i, l_i, m_i are read and written: Tc·(3Nd + 4N) words. With Bc ≈ M/4d this is the paper's
    Θ(N²d²/M). `block_r` sets the inner loop's granularity and does not change the count.
    """
    _positive(n=n, d=d, block_r=block_r, block_c=block_c, batch_heads=batch_heads)
    t_c = -(-n // block_c)
    per_head = 2.0 * n * d + t_c * (3.0 * n * d + 4.0 * n)
    return elem_bytes * per_head * batch_heads


# --- softmax, elementwise, reduction ------------------------------------------------------------


SOFTMAX_PASSES: dict[str, tuple[int, int]] = {
    "three-pass": (3, 1),   # max, sum of exp, normalise
    "two-pass": (2, 1),     # Dukhan & Ablavatski 2020: (max, sum) together, then normalise
    "fused": (0, 0),        # online softmax inside a fused attention tile: no pass of its own
}


def softmax_passes(algorithm: str = "three-pass") -> tuple[int, int]:
    """(reads, writes) of the input-sized array that a softmax algorithm makes."""
    if algorithm not in SOFTMAX_PASSES:
        raise TiermapError(f"unknown softmax algorithm {algorithm!r}; "
                           f"expected one of {', '.join(SOFTMAX_PASSES)}")
    return SOFTMAX_PASSES[algorithm]


def softmax_traffic_bytes(rows: int, cols: int, elem_bytes: float,
                          algorithm: str = "three-pass") -> float:
    """Bytes a row softmax of a rows × cols array moves with the given number of passes."""
    reads, writes = softmax_passes(algorithm)
    return float(elem_bytes) * rows * cols * (reads + writes)


def elementwise_traffic_bytes(num_elements: int, num_inputs: int, elem_bytes: float,
                              num_outputs: int = 1) -> float:
    """Compulsory traffic of an elementwise op: read every input, write every output once."""
    return float(elem_bytes) * num_elements * (num_inputs + num_outputs)


def reduction_traffic_bytes(in_elements: int, out_elements: int, elem_bytes: float) -> float:
    """Compulsory traffic of a reduction: read the input once, write the reduced output once."""
    return float(elem_bytes) * (in_elements + out_elements)


# --- transfers spread over steps ---------------------------------------------------------------


# best_spread_span tries run lengths 1, 2, ... growing by this ratio, and the whole window.
SPREAD_CLASS_RATIO = 1.25


def best_spread_span(transfer_s: float, op_s: np.ndarray) -> tuple[int, int, float]:
    """The run of steps (first, last offsets into `op_s`) to spread a transfer over so that it
    adds the least time to steps taking `op_s`, and that time. Ties go to the longer run (it
    leaves more room to other transfers), then the earlier one. Lengths tried: 1, 2, ...
    growing by SPREAD_CLASS_RATIO, and the whole window.

    Lengths are tried longest first and the search stops at the first run that hides the
    transfer completely (no shorter run can beat it, and ties go to the longer), which on long
    windows is usually the first length tried.
    """
    m = len(op_s)
    if m == 0:
        raise TiermapError("a transfer needs at least one step")
    lengths_set = {m}
    length = 1
    while length < m:
        lengths_set.add(length)
        length = max(length + 1, int(length * SPREAD_CLASS_RATIO))
    best = (0, m - 1, math.inf)
    for length in sorted(lengths_set, reverse=True):  # longest first: ties go to it
        extra = np.maximum(transfer_s / length - op_s, 0.0)
        cum = np.concatenate([[0.0], np.cumsum(extra)])
        sums = cum[length:] - cum[:-length]  # by start, starts 0 .. m - length
        start = int(np.argmin(sums))  # the earliest of equal sums
        added_s = float(sums[start])
        if added_s < best[2]:
            best = (start, start + length - 1, added_s)
        if added_s <= 0.0:
            break
    return best


# --- the program bound --------------------------------------------------------------------------


def _best_bw(nbytes: int, tiers: Sequence[Tier], read: bool) -> float:
    """Fastest bandwidth of a residency tier that can hold `nbytes` (any, if none can)."""
    fits = [t for t in tiers if t.capacity_bytes >= nbytes] or list(tiers)
    return max(t.read_bytes_per_s if read else t.write_bytes_per_s for t in fits)


def _knapsack_time_s(items: Sequence[tuple[float, float]], tiers: Sequence[Tier]) -> float:
    """Least Σ bytes/bandwidth when tensors that coexist must share the tiers' capacities.

    `items` are (nbytes resident, bytes moved). Relaxed to fractional placement with each tier at
    max(read, write) bandwidth: the optimum then puts the most bytes-moved-per-byte-held items on
    the fastest tiers first (rearrangement inequality), so this greedy is exact for the relaxation.
    """
    order = sorted((t for t in tiers), key=lambda t: -max(t.read_bytes_per_s,
                                                          t.write_bytes_per_s))
    caps = [float(t.capacity_bytes) for t in order]
    bws = [max(t.read_bytes_per_s, t.write_bytes_per_s) for t in order]
    total_s = 0.0
    ti = 0
    for held, moved in sorted(items, key=lambda it: -(it[1] / it[0])):
        density = moved / held
        left = float(held)
        while left > 0.0 and ti < len(caps):
            take = min(left, caps[ti])
            total_s += take * density / bws[ti]
            caps[ti] -= take
            left -= take
            if caps[ti] <= 0.0:
                ti += 1
        if left > 0.0:  # more than every tier holds: no plan exists; charge the slowest tier
            total_s += left * density / bws[-1]
    return total_s


def program_lower_bound_s(program: Program, target: Target, fusion: Fusion | None = None) -> float:
    """A time no plan of `program` on `target` (with this fusion) can beat under the cost model.

    Σ over kernels (fusion groups and lone ops) of max(compute_s, memory_s) + op_overhead_s, with
    memory_s the larger of two bounds on the kernel's Σ bytes / bandwidth:
    (a) each tensor moved at the fastest bandwidth of a residency tier whose capacity can hold it;
    (b) per step, the tensors read or written there coexist, so together they fit the tiers'
        capacities: a fractional knapsack over the tiers (`_knapsack_time_s`).
    Why no plan beats it: a step lasts at least its op's time and a group's shares sum to the
    group's time; a read comes from, and a write goes to, a residency tier the tensor is in at that
    step, which holds it (capacity), alongside the kernel's other tensors of that step. Transfers
    only add time. Valid for every plan that keeps tensors in residency tiers within capacity.
    """
    tiers = target.residency_tiers or target.tiers[-1:]
    values = program.values
    compute = [compute_time_s(op, target) for op in program.ops]
    overhead_s = target.op_overhead_s
    total_s = 0.0
    for k in program_kernels(program, fusion):
        compute_s = sum(compute[s] for s in k.steps)
        simple_s = 0.0
        by_step: dict[int, dict[str, list[float]]] = {}
        for entries, read in ((k.reads, True), (k.writes, False)):
            for vid, step, nbytes in entries:
                if nbytes <= 0:
                    continue
                held = values[vid].nbytes if vid in values else 0
                simple_s += nbytes / _best_bw(held, tiers, read)
                slot = by_step.setdefault(step, {}).setdefault(vid, [float(held), 0.0])
                slot[1] += nbytes
        knap_s = 0.0
        for per_vid in by_step.values():
            items = [(h, m) for h, m in per_vid.values() if h > 0]
            knap_s += _knapsack_time_s(items, tiers)
        total_s += max(compute_s, simple_s, knap_s) + overhead_s
    return total_s * (1.0 - BOUND_ROUNDING_SLACK)

"""The `tile` pass: block sizes for fused attention and large matmuls that minimise HBM traffic.

Budget. `M` is the per-core on-chip budget in words: `target.scratch_tier` capacity / units (the
fastest tier's share where a target has no per-unit tier), divided by the element size.

Attention forward (one head; Nq queries, Nk keys, head dims d and dv; words of `elem_bytes`).
Working set of one step: Q_i and the O_i accumulator (Br·(d + dv)), K_j and V_j
(Bc·(d + dv)), the score/probability block S_ij (Br·Bc) and the row statistics m_i, l_i (2Br):

    (Br + Bc)·(d + dv) + Br·Bc + 2·Br ≤ M

(FlashAttention-1's own rule (2Bc + Br)·d + Br·Bc ≤ M leaves out the O_i block and m, l.)
Two loop orders are searched over every legal (Br, Bc) (powers of two and multiples of 16, from
16 up to the length, plus FlashAttention-1's own sizes):

- q-outer (FlashAttention-2): Q read once, O written once, K and V read once per query block
  (only up to the diagonal when causal): `e·(Nq(d + dv) + (d + dv)·Σ_i kv_rows(i)) + 4·Nq`
  (the float32 log-sum-exp, when a backward needs it).
- kv-outer (FlashAttention-1, Algorithm 1): K and V read once; per key block, every query row
  that block reaches reads Q_i and reads and writes O_i, l_i, m_i:
  `e·(Nk(d + dv) + Σ_j q_rows(j)·(d + 2dv + 4))` — for Nq = Nk, d = dv and no mask this is
  `bounds.flash_attention_traffic_bytes`.

Attention backward, two orders searched. Split (FlashAttention-2, JAX's Pallas GPU kernel; every
output written once): a pre-pass D = rowsum(dO ∘ O) reads O and dO; a kv-outer pass computes
dK, dV (working set Bc·2(d + dv) + Br·(d + dv) + 2·Br·Bc + 2Br) and re-reads Q, dO and the
float32 statistics per key block; a q-outer pass computes dQ (working set
Br·(2d + dv) + Bc·(d + dv) + 2·Br·Bc + 2Br) and re-reads K and V per query block. One pass
(FlashAttention-1, Algorithm 4): kv-outer, reading Q_i, O_i, dO_i, dQ_i and writing dQ_i per
reached query block (working set 2Bc(d + dv) + 2Br(d + dv) + 2·Br·Bc + 3Br). The reference is
Algorithm 4 at FlashAttention-1's own block rule.

Matmuls and convolutions (implicit GEMM m·n·k): output tiles Tm × Tn with a k-panel Tk,
working set Tm·Tn + Tk·(Tm + Tn) ≤ M, traffic `e·(m·k·⌈n/Tn⌉ + k·n·⌈m/Tm⌉ + m·n)`, beside
the Hong–Kung/Smith bound 2mnk/√M + mn. Matmul tiles are recorded (TileChoice) but the cost
model keeps charging a matmul its compulsory traffic fused or not, so fusion compares like with
like; attention groups carry their tiled reads in `reads_per_input`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from tiermap.costmodel import io_bounds as bounds
from tiermap.errors import TiermapError
from tiermap.ir.fusion import Fusion, FusionGroup
from tiermap.ir.plan import TileChoice
from tiermap.ir.program import DTYPE_BITS, Op, Program

if TYPE_CHECKING:
    from tiermap.hardware.target import Target
    from tiermap.passes.base import PipelineState

MIN_BLOCK = 16  # smallest block side searched (tensor-core tiles are 16 wide)
STATS_BYTES = 4  # float32 row statistics (m, l, log-sum-exp, D)
MATMUL_KINDS = frozenset({"stablehlo.dot_general", "stablehlo.dot", "stablehlo.convolution"})


def elem_bytes_of(dtype: str) -> float:
    """Bytes per element of an IR dtype name."""
    return DTYPE_BITS.get(dtype, 32) / 8.0


def tile_budget_bytes(target: Target) -> tuple[int, str]:
    """(bytes of on-chip memory one core may use for a tile, the tier it comes from)."""
    tier = target.scratch_tier
    if tier is not None:
        return tier.capacity_bytes // max(1, target.units), tier.name
    fastest = target.tiers[0]
    return fastest.capacity_bytes // max(1, target.units), fastest.name


def legal_block_sizes(n: int, extra: tuple[int, ...] = (), min_size: int = MIN_BLOCK
                      ) -> np.ndarray:
    """Powers of two and multiples of 16 up to n, n itself, and any `extra` sizes ≤ n.

    Sizes below `min_size` are dropped (unless n itself is smaller): matrix units work on tiles
    at least 16 wide, and a narrower block would leave them idle.
    """
    floor = min(min_size, n)
    sizes = {1 << p for p in range(max(1, n).bit_length()) if floor <= 1 << p <= n}
    sizes.update(range(16, n + 1, 16))
    sizes.add(n)
    sizes.update(x for x in extra if floor <= x <= n)
    return np.array(sorted(sizes), dtype=np.int64)


# --- attention traffic (one head, bytes) --------------------------------------------------------


def _kv_rows_per_q_block(nq: int, nk: int, br: int, bc: np.ndarray, causal: bool) -> np.ndarray:
    """For each Bc in `bc`: Σ over query blocks of key rows read (q-outer order)."""
    tq = -(-nq // br)
    if not causal:
        return np.full(bc.shape, float(tq * nk))
    last_row = np.minimum((np.arange(tq) + 1) * br, nq) - 1  # [tq]
    blocks = last_row[None, :] // bc[:, None] + 1  # [len(bc), tq]
    return np.minimum(blocks * bc[:, None], nk).sum(axis=1).astype(float)


def _q_rows_per_kv_block(nq: int, nk: int, br: np.ndarray, bc: int, causal: bool) -> np.ndarray:
    """For each Br in `br`: Σ over key blocks of query rows that read it (kv-outer order)."""
    tk = -(-nk // bc)
    if not causal:
        return np.full(br.shape, float(tk * nq))
    first_row = np.arange(tk) * bc  # [tk]
    start = (first_row[None, :] // br[:, None]) * br[:, None]  # [len(br), tk]
    return np.maximum(nq - start, 0).sum(axis=1).astype(float)


def forward_working_set_words(br: int, bc: int, d: int, dv: int) -> int:
    """(Br + Bc)(d + dv) + Br·Bc + 2Br words: Q_i, O_i, K_j, V_j, S_ij, m_i, l_i."""
    return (br + bc) * (d + dv) + br * bc + 2 * br


def forward_traffic_bytes(nq: int, nk: int, d: int, dv: int, br: int, bc: int, q_outer: bool,
                          elem_bytes: float, causal: bool = False, with_lse: bool = False
                          ) -> float:
    """HBM bytes of one head's tiled forward in the given loop order (module docstring)."""
    lse = STATS_BYTES * nq if with_lse else 0.0
    if q_outer:
        rows = float(_kv_rows_per_q_block(nq, nk, br, np.array([bc]), causal)[0])
        return elem_bytes * (nq * (d + dv) + (d + dv) * rows) + lse
    rows = float(_q_rows_per_kv_block(nq, nk, np.array([br]), bc, causal)[0])
    return elem_bytes * (nk * (d + dv) + rows * (d + 2 * dv + 4)) + lse


@dataclass(frozen=True)
class AttentionTiles:
    """A forward tiling and what it moves (all heads).

    Attributes:
        block_q: Br, query rows per block; block_k: Bc, key/value rows per block.
        q_outer: loop order (True: FlashAttention-2's query-block-outer; False: FA-1's).
        traffic_bytes: HBM bytes of the forward, all heads.
        working_set_bytes: on-chip bytes of one step.
        q_reads, kv_reads: average times each Q and each K/V element is read from HBM.
    """

    block_q: int
    block_k: int
    q_outer: bool
    traffic_bytes: float
    working_set_bytes: int
    q_reads: float
    kv_reads: float


def fa1_blocks(fast_bytes: float, d: int, elem_bytes: float) -> tuple[int, int]:
    """FlashAttention-1's rule at this capacity: (Br, Bc) = (min(⌈M/4d⌉, d), ⌈M/4d⌉)."""
    fb = bounds.flash_attention_blocks(fast_bytes, d, elem_bytes)
    return fb.block_r, fb.block_c


def fa1_forward_traffic_bytes(nq: int, nk: int, d: int, dv: int, fast_bytes: float,
                              elem_bytes: float, causal: bool = False, with_lse: bool = False,
                              batch_heads: int = 1) -> tuple[float, int, int]:
    """(bytes, Br, Bc) of FlashAttention-1's Algorithm 1 at its own block rule, all heads."""
    br, bc = fa1_blocks(fast_bytes, d, elem_bytes)
    per_head = forward_traffic_bytes(nq, nk, d, dv, min(br, nq), min(bc, nk), False, elem_bytes,
                                     causal, with_lse)
    return per_head * batch_heads, br, bc


def _best_index(*keys: np.ndarray) -> int:
    """Index of the lexicographically smallest (keys[0], keys[1], ...)."""
    return int(np.lexsort(tuple(reversed(keys)))[0])


def search_forward_tiles(nq: int, nk: int, d: int, dv: int, fast_bytes: float,
                         elem_bytes: float, causal: bool = False, with_lse: bool = False,
                         batch_heads: int = 1) -> AttentionTiles:
    """Exhaustive search over legal (Br, Bc) and both loop orders for the least HBM traffic.

    Ties go to the q-outer order, then to the larger block area, then to the larger Bc.

    Raises:
        TiermapError: not even 1×1 blocks fit the budget.
    """
    words = int(fast_bytes // elem_bytes)
    fa_br, fa_bc = fa1_blocks(fast_bytes, d, elem_bytes) if words >= 3 * d + 1 else (1, 1)
    sizes_q = legal_block_sizes(nq, (fa_br,))
    sizes_k = legal_block_sizes(nk, (fa_bc,))
    lse = STATS_BYTES * nq if with_lse else 0.0
    cols: dict[str, list[np.ndarray]] = {"traffic": [], "order": [], "br": [], "bc": [],
                                         "rows": []}

    def add(traffic: np.ndarray, order: int, br: np.ndarray, bc: np.ndarray,
            rows: np.ndarray) -> None:
        cols["traffic"].append(traffic)
        cols["order"].append(np.full(traffic.shape, order))
        cols["br"].append(br)
        cols["bc"].append(bc)
        cols["rows"].append(rows)

    # (1) q-outer (order 0): for each Br, every Bc that fits; K, V read once per query block.
    for br in sizes_q.tolist():
        room = words - br * (d + dv) - 2 * br
        bcs = sizes_k[sizes_k * (d + dv + br) <= room]
        if bcs.size:
            rows = _kv_rows_per_q_block(nq, nk, br, bcs, causal)
            add(elem_bytes * (nq * (d + dv) + (d + dv) * rows) + lse, 0,
                np.full(bcs.shape, br), bcs, rows)
    # (2) kv-outer (order 1): for each Bc, every Br that fits; Q, O, l, m per key block.
    for bc in sizes_k.tolist():
        room = words - bc * (d + dv)
        brs = sizes_q[sizes_q * (d + dv + bc + 2) <= room]
        if brs.size:
            rows = _q_rows_per_kv_block(nq, nk, brs, bc, causal)
            add(elem_bytes * (nk * (d + dv) + rows * (d + 2 * dv + 4)) + lse, 1, brs,
                np.full(brs.shape, bc), rows)
    if not cols["traffic"]:
        raise TiermapError(
            f"attention tiling: {fast_bytes:.0f} bytes per core cannot hold one 1×1 block for "
            f"head dims d={d}, dv={dv} ({forward_working_set_words(1, 1, d, dv)} words of "
            f"{elem_bytes} bytes needed); fix: a target with a larger on-chip tier")
    traffic, order, br_a, bc_a, rows_a = (np.concatenate(cols[c]) for c in
                                          ("traffic", "order", "br", "bc", "rows"))
    i = _best_index(traffic, order, -br_a * bc_a, -bc_a)
    br, bc, q_outer = int(br_a[i]), int(bc_a[i]), bool(order[i] == 0)
    if q_outer:
        q_reads, kv_reads = 1.0, float(rows_a[i]) / nk
    else:
        q_reads = (float(rows_a[i]) * (d + 2 * dv + 4) - nq * dv) / (nq * d)
        kv_reads = 1.0
    return AttentionTiles(br, bc, q_outer, float(traffic[i]) * batch_heads,
                          int(forward_working_set_words(br, bc, d, dv) * elem_bytes),
                          q_reads, kv_reads)


# --- attention backward -------------------------------------------------------------------------


@dataclass(frozen=True)
class BackwardTiles:
    """A backward tiling and what it moves (all heads).

    Attributes:
        one_pass: True for FlashAttention-1's Algorithm 4 order (one kv-outer pass that reads
            and writes dQ per key block); False for the split two-pass backward.
        block_q_dkv, block_kv_dkv: Br, Bc of the kv-outer pass computing dK, dV (one pass:
            the only pass).
        block_q_dq, block_kv_dq: Br, Bc of the q-outer pass computing dQ (one pass: the same
            as the dK, dV blocks).
        traffic_bytes: HBM bytes of the backward, all heads.
        working_set_bytes: on-chip bytes of the larger pass's step.
        q_reads, do_reads, kv_reads, stats_reads: average times Q, dO, K and V, and the row
            statistics are read. Traffic with no input of its own — the pre-pass or one-pass
            read of O, the one-pass's repeated dQ reads and writes — is charged to the tensor
            of the same shape (O's to dO, dQ's to Q), so the group's bytes match this model.
    """

    one_pass: bool
    block_q_dkv: int
    block_kv_dkv: int
    block_q_dq: int
    block_kv_dq: int
    traffic_bytes: float
    working_set_bytes: int
    q_reads: float
    do_reads: float
    kv_reads: float
    stats_reads: float


def dkv_working_set_words(br: int, bc: int, d: int, dv: int) -> int:
    """K_j, V_j, dK_j, dV_j, Q_i, dO_i, S/P and dP/dS blocks, two statistics."""
    return 2 * bc * (d + dv) + br * (d + dv) + 2 * br * bc + 2 * br


def dq_working_set_words(br: int, bc: int, d: int, dv: int) -> int:
    """Q_i, dO_i, dQ_i, K_j, V_j, S/P and dP/dS blocks, two statistics."""
    return br * (2 * d + dv) + bc * (d + dv) + 2 * br * bc + 2 * br


def one_pass_working_set_words(br: int, bc: int, d: int, dv: int) -> int:
    """K_j, V_j, dK_j, dV_j, Q_i, dQ_i, O_i, dO_i, S/P and dP/dS blocks, three statistics."""
    return 2 * bc * (d + dv) + br * (2 * d + 2 * dv) + 2 * br * bc + 3 * br


def _best(parts: list[tuple[np.ndarray, ...]]) -> tuple[float, int, int, float] | None:
    """(traffic, Br, Bc, rows) of the least traffic, then largest area, then largest Bc."""
    if not parts:
        return None
    t, b_r, b_c, r = (np.concatenate(x) for x in zip(*parts, strict=True))
    i = _best_index(t, -b_r * b_c, -b_c)
    return float(t[i]), int(b_r[i]), int(b_c[i]), float(r[i])


def search_backward_tiles(nq: int, nk: int, d: int, dv: int, fast_bytes: float,
                          elem_bytes: float, causal: bool = False, batch_heads: int = 1
                          ) -> BackwardTiles:
    """Least-traffic backward: the split two-pass order (each pass's blocks searched on their
    own) or FlashAttention-1's one-pass order, exhaustive over legal sizes.

    Raises:
        TiermapError: neither order can hold even 1×1 blocks.
    """
    words = int(fast_bytes // elem_bytes)
    e, st = elem_bytes, STATS_BYTES
    sizes_q = legal_block_sizes(nq)
    sizes_k = legal_block_sizes(nk)
    # (1) split, dK/dV pass: kv-outer; Q, dO and two statistics per reached query row.
    dkv: list[tuple[np.ndarray, ...]] = []
    # (3) one pass: kv-outer; Q, O, dO, dQ read and dQ written per reached query row.
    one: list[tuple[np.ndarray, ...]] = []
    for bc in sizes_k.tolist():
        room = words - 2 * bc * (d + dv)
        brs = sizes_q[sizes_q * (d + dv + 2 * bc + 2) <= room]
        if brs.size:
            rows = _q_rows_per_kv_block(nq, nk, brs, bc, causal)
            dkv.append((e * 2 * nk * (d + dv) + rows * (e * (d + dv) + 2 * st), brs,
                        np.full(brs.shape, bc), rows))
        brs = sizes_q[sizes_q * (2 * d + 2 * dv + 2 * bc + 3) <= room]
        if brs.size:
            rows = _q_rows_per_kv_block(nq, nk, brs, bc, causal)
            one.append((e * 2 * nk * (d + dv) + rows * (e * (3 * d + 2 * dv) + 2 * st), brs,
                        np.full(brs.shape, bc), rows))
    # (2) split, dQ pass: q-outer; K and V per reached key row.
    dq: list[tuple[np.ndarray, ...]] = []
    for br in sizes_q.tolist():
        room = words - br * (2 * d + dv) - 2 * br
        bcs = sizes_k[sizes_k * (d + dv + 2 * br) <= room]
        if bcs.size:
            rows = _kv_rows_per_q_block(nq, nk, br, bcs, causal)
            dq.append((e * (nq * (2 * d + dv) + (d + dv) * rows) + 2 * st * nq,
                       np.full(bcs.shape, br), bcs, rows))
    best_dkv, best_dq, best_one = _best(dkv), _best(dq), _best(one)
    options: list[BackwardTiles] = []
    if best_dkv is not None and best_dq is not None:
        pre = e * 2 * nq * dv + st * nq  # D = rowsum(dO ∘ O)
        ws = max(dkv_working_set_words(best_dkv[1], best_dkv[2], d, dv),
                 dq_working_set_words(best_dq[1], best_dq[2], d, dv))
        q_reads = 1.0 + best_dkv[3] / nq
        options.append(BackwardTiles(
            False, best_dkv[1], best_dkv[2], best_dq[1], best_dq[2],
            (pre + best_dkv[0] + best_dq[0]) * batch_heads, int(ws * e),
            q_reads, q_reads + 2.0, 1.0 + best_dq[3] / nk, q_reads))
    if best_one is not None:
        one_rows = best_one[3]
        options.append(BackwardTiles(
            True, best_one[1], best_one[2], best_one[1], best_one[2],
            best_one[0] * batch_heads,
            int(one_pass_working_set_words(best_one[1], best_one[2], d, dv) * e),
            (3.0 * one_rows - nq) / nq, 2.0 * one_rows / nq, 1.0, one_rows / nq))
    if not options:
        raise TiermapError(
            f"attention backward tiling: {fast_bytes:.0f} bytes per core cannot hold one 1×1 "
            f"block for head dims d={d}, dv={dv}; fix: a target with a larger on-chip tier")
    return min(options, key=lambda b: (b.traffic_bytes, b.one_pass))


def fa1_backward_traffic_bytes(nq: int, nk: int, d: int, dv: int, fast_bytes: float,
                               elem_bytes: float, causal: bool = False, batch_heads: int = 1
                               ) -> float:
    """FlashAttention-1's Algorithm 4 at its block rule: K, V, dK, dV once; per key block every
    reached query row reads Q_i, O_i, dO_i, dQ_i, l_i, m_i and writes dQ_i."""
    br, bc = fa1_blocks(fast_bytes, d, elem_bytes)
    br, bc = min(br, nq), min(bc, nk)
    rows = float(_q_rows_per_kv_block(nq, nk, np.array([br]), bc, causal)[0])
    per_head = elem_bytes * (2 * nk * (d + dv) + rows * (3 * d + 2 * dv + 2))
    return per_head * batch_heads


# --- attention lower bound ----------------------------------------------------------------------


def attention_lower_bound_bytes(nq: int, nk: int, d: int, dv: int, fast_bytes: float,
                                elem_bytes: float, batch_heads: int = 1) -> float:
    """Saha & Ye's bound for one attention (bounds.attention_io_lower_bound_bytes when square).

    For Nq ≠ Nk the N² of the bound becomes Nq·Nk, and the floor is the compulsory
    Nq·d + Nk·(d + dv) + Nq·dv words.
    """
    if nq == nk and d == dv:
        return bounds.attention_io_lower_bound_bytes(nq, d, fast_bytes, elem_bytes, batch_heads)
    words = max(1.0, math.floor(fast_bytes / elem_bytes))
    if words >= d * d:
        per_head = float(nq) * nk * d * dv / words
    else:
        per_head = float(nq) * nk * d / math.sqrt(words)
    per_head = max(per_head, float(nq * d + nk * (d + dv) + nq * dv))
    return elem_bytes * per_head * batch_heads


# --- matmul -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulTiles:
    """Output tiles Tm × Tn with k-panel Tk, and the traffic they cause (all batches)."""

    tile_m: int
    tile_n: int
    tile_k: int
    traffic_bytes: float
    working_set_bytes: int
    a_reads: int
    b_reads: int


def matmul_traffic_bytes(m: int, n: int, k: int, tm: int, tn: int, elem_bytes: float) -> float:
    """e·(m·k·⌈n/Tn⌉ + k·n·⌈m/Tm⌉ + m·n): A re-read per column of tiles, B per row."""
    return elem_bytes * (m * k * -(-n // tn) + k * n * -(-m // tm) + m * n)


def search_matmul_tiles(m: int, n: int, k: int, fast_bytes: float, elem_bytes: float,
                        batch: int = 1) -> MatmulTiles:
    """Least-traffic legal tiles with Tm·Tn + Tk·(Tm + Tn) ≤ M (Tk = min(k, 16)).

    Raises:
        TiermapError: not even 1×1 tiles fit.
    """
    words = int(fast_bytes // elem_bytes)
    tk = min(k, 16)
    sizes_m = legal_block_sizes(m)
    sizes_n = legal_block_sizes(n)
    best: tuple[tuple[float, int], MatmulTiles] | None = None
    for tm in sizes_m.tolist():
        tns = sizes_n[sizes_n * (tm + tk) <= words - tk * tm]
        if tns.size == 0:
            continue
        traffic = elem_bytes * (m * k * -(-n // tns) + k * n * -(-m // tm) + m * n)
        idx = int(np.argmin(traffic))
        tn = int(tns[idx])
        key = (float(traffic[idx]), -tm * tn)
        if best is None or key < best[0]:
            ws = int((tm * tn + tk * (tm + tn)) * elem_bytes)
            best = (key, MatmulTiles(tm, tn, tk, float(traffic[idx]) * batch, ws,
                                     -(-n // tn), -(-m // tm)))
    if best is None:
        raise TiermapError(f"matmul tiling: {fast_bytes:.0f} bytes per core cannot hold a 1×1 "
                           f"tile with a {tk}-deep panel; fix: a target with more on-chip memory")
    return best[1]


def square_tile_traffic_bytes(m: int, n: int, k: int, fast_bytes: float, elem_bytes: float,
                              batch: int = 1) -> tuple[float, int]:
    """(bytes, T) of the classic square-tile rule: the largest T with T² + 2·Tk·T ≤ M."""
    words = int(fast_bytes // elem_bytes)
    tk = min(k, 16)
    t = max(1, int(math.isqrt(tk * tk + words) - tk))
    tm, tn = min(t, m), min(t, n)
    return matmul_traffic_bytes(m, n, k, tm, tn, elem_bytes) * batch, t


def matmul_dims(op_attrs: dict[str, int], kind: str) -> tuple[int, int, int, int]:
    """(batch, m, n, k) of a dot (attrs batch/m/n/k) or convolution as implicit GEMM."""
    if kind == "stablehlo.convolution":
        m = int(op_attrs.get("n", 1)) * int(op_attrs.get("out_spatial", 1))
        n = int(op_attrs.get("cout", 1))
        k = int(op_attrs.get("cin", 1)) * int(op_attrs.get("taps", 1))
        return 1, m, n, k
    return (int(op_attrs.get("batch", 1)), int(op_attrs.get("m", 1)), int(op_attrs.get("n", 1)),
            int(op_attrs.get("k", 1)))


# --- the pass -----------------------------------------------------------------------------------


def _attention_choice(group: FusionGroup, program: Program, fast_bytes: int, tier: str
                      ) -> tuple[FusionGroup, TileChoice]:
    a = group.attrs
    nq, nk, d, dv = int(a["q_len"]), int(a["kv_len"]), int(a["head_dim"]), int(a["v_head_dim"])
    bh, causal = int(a["batch_heads"]), bool(a["causal"])
    e = elem_bytes_of(str(a["dtype"]))
    lower = attention_lower_bound_bytes(nq, nk, d, dv, fast_bytes, e, bh)
    rpi: dict[str, float] = dict(group.reads_per_input)
    if group.kind == "attention":
        with_lse = bool(a.get("backward", False))
        t = search_forward_tiles(nq, nk, d, dv, fast_bytes, e, causal, with_lse, bh)
        ref, fbr, fbc = fa1_forward_traffic_bytes(nq, nk, d, dv, fast_bytes, e, causal,
                                                  with_lse, bh)
        rpi[str(a["q"])] = t.q_reads
        rpi[str(a["k"])] = t.kv_reads
        rpi[str(a["v"])] = t.kv_reads
        params = {"block_q": t.block_q, "block_k": t.block_k, "q_outer": int(t.q_outer)}
        choice = TileChoice(
            group=group.id, kind="attention", params=params, traffic_bytes=t.traffic_bytes,
            lower_bound_bytes=lower, reference_bytes=ref,
            reference=(f"FlashAttention-1 rule on {tier} ({fast_bytes} B/core): "
                       f"Bc=ceil(M/4d)={fbc}, Br=min(Bc,d)={fbr}, kv-outer"))
        ws = t.working_set_bytes
    else:
        b = search_backward_tiles(nq, nk, d, dv, fast_bytes, e, causal, bh)
        ref = fa1_backward_traffic_bytes(nq, nk, d, dv, fast_bytes, e, causal, bh)
        for role, reads in (("q", b.q_reads), ("do", b.do_reads), ("k", b.kv_reads),
                            ("v", b.kv_reads)):
            if a.get(role):
                rpi[str(a[role])] = reads
        for vid in a.get("row_inputs", ()):
            rpi[str(vid)] = b.stats_reads
        for vid in a.get("recomputed", ()):
            rpi[str(vid)] = 0.0
        params = {"block_q_dkv": b.block_q_dkv, "block_kv_dkv": b.block_kv_dkv,
                  "block_q_dq": b.block_q_dq, "block_kv_dq": b.block_kv_dq,
                  "one_pass": int(b.one_pass)}
        fbr, fbc = fa1_blocks(fast_bytes, d, e)
        need = one_pass_working_set_words(min(fbr, nq), min(fbc, nk), d, dv)
        words = int(fast_bytes // e)
        over = (f"; its blocks need {need} words > M = {words}, so this reference is "
                "optimistic") if need > words else ""
        choice = TileChoice(
            group=group.id, kind="attention_bwd", params=params, traffic_bytes=b.traffic_bytes,
            lower_bound_bytes=lower, reference_bytes=ref,
            reference=(f"FlashAttention-1 Algorithm 4 on {tier} ({fast_bytes} B/core): "
                       f"Bc={fbc}, Br={fbr}{over}"))
        ws = b.working_set_bytes
    return replace(group, reads_per_input=rpi, working_set_bytes=ws), choice


def _matmul_choice(group_id: str, kind: str, attrs: dict[str, int], dtype: str,
                   fast_bytes: int) -> TileChoice | None:
    batch, m, n, k = matmul_dims(attrs, kind)
    e = elem_bytes_of(dtype)
    compulsory = e * (m * k + k * n + m * n)
    if compulsory <= fast_bytes:
        return None
    t = search_matmul_tiles(m, n, k, fast_bytes, e, batch)
    ref, side = square_tile_traffic_bytes(m, n, k, fast_bytes, e, batch)
    lower = bounds.matmul_io_lower_bound_bytes(m, n, k, fast_bytes, e) * batch
    return TileChoice(
        group=group_id, kind="matmul",
        params={"tile_m": t.tile_m, "tile_n": t.tile_n, "tile_k": t.tile_k},
        traffic_bytes=t.traffic_bytes, lower_bound_bytes=lower, reference_bytes=ref,
        reference=f"square tiles {side}x{side}")


def tile_fusion(program: Program, target: Target, fusion: Fusion) -> Fusion:
    """Tile every attention group (updating reads_per_input, working_set_bytes) and record a
    TileChoice per attention group and per matmul/convolution too large for one core's tile.

    Lone large matmuls are recorded under their op id.
    """
    fast_bytes, tier = tile_budget_bytes(target)
    groups: list[FusionGroup] = []
    tiles: list[TileChoice] = []
    notes: list[str] = []
    fused_ops = fusion.group_of()

    def matmul_choice(name: str, dot: Op, budget: int) -> TileChoice | None:
        try:
            return _matmul_choice(name, dot.kind, dict(dot.attrs), dot.dtype, budget)
        except TiermapError as exc:
            notes.append(f"{name}: no matmul tile fits ({exc}); charged compulsory traffic")
            return None

    for group in fusion.groups:
        if group.kind in ("attention", "attention_bwd"):
            try:
                new_group, choice = _attention_choice(group, program, fast_bytes, tier)
            except TiermapError as exc:
                # No block fits one core: the group cannot run fused; its ops run alone.
                notes.append(f"{group.id}: left unfused: {exc}")
                continue
            groups.append(new_group)
            tiles.append(choice)
            continue
        if group.kind == "matmul":
            dot = next(program.op(o) for o in group.op_ids if program.op(o).kind in MATMUL_KINDS)
            budget = fast_bytes // (1 + int(group.attrs.get("epilogue_tiles", 0)))
            try:
                mm = _matmul_choice(group.id, dot.kind, dict(dot.attrs), dot.dtype, budget)
            except TiermapError as exc:
                notes.append(f"{group.id}: left unfused: {exc}")
                continue
            if mm is not None:
                tiles.append(mm)
        groups.append(group)
    for op in program.ops:
        if op.kind in MATMUL_KINDS and op.id not in fused_ops:
            mm = matmul_choice(op.id, op, fast_bytes)
            if mm is not None:
                tiles.append(mm)
    return Fusion(groups=tuple(groups), tiles=tuple(tiles),
                  notes=tuple(fusion.notes) + tuple(notes), warnings=fusion.warnings)


@dataclass(frozen=True)
class TilePass:
    """Choose block sizes for fused attention and large matmuls.

    Requires: `state.fusion` from the `fuse` pass (attention groups carry their facts in
    `attrs`). Ensures: attention groups' `reads_per_input` and `working_set_bytes` follow the
    chosen tiles; `fusion.tiles` holds one TileChoice per attention group and per matmul or
    convolution larger than one core's budget.
    """

    name: ClassVar[str] = "tile"

    def run(self, state: PipelineState) -> PipelineState:
        from dataclasses import replace as _replace

        return _replace(state, fusion=tile_fusion(state.program, state.target, state.fusion))

"""IO lower bounds and tiled-kernel traffic (matmul, attention, softmax, elementwise, reductions).

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
"""

from __future__ import annotations

import math
from typing import NamedTuple

from tiermap.errors import TiermapError


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

"""IO lower bounds and tiled traffic: formulas by hand, regimes, and bound ≤ achievable."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.costmodel.helpers import OVERHEAD_S, chain_program, everywhere, two_tier_target
from tiermap.bounds.knapsack import SPREAD_CLASS_RATIO, best_spread_span, program_lower_bound_s
from tiermap.costmodel.evaluate import evaluate
from tiermap.costmodel.io_bounds import (
    attention_compulsory_bytes,
    attention_io_lower_bound_bytes,
    elementwise_traffic_bytes,
    flash_attention_blocks,
    flash_attention_traffic_bytes,
    flash_attention_working_set_words,
    matmul_compulsory_bytes,
    matmul_io_lower_bound_bytes,
    reduction_traffic_bytes,
    softmax_passes,
    softmax_traffic_bytes,
    tiled_matmul_traffic_bytes,
    unfused_attention_traffic_bytes,
)
from tiermap.errors import TiermapError
from tiermap.ir.plan import Residency


def test_flash_attention_blocks_known_cases() -> None:
    # 100 KiB of f16 = 51200 words, d = 64: Bc = ⌈51200 / 256⌉ = 200, Br = min(200, 64) = 64.
    blocks = flash_attention_blocks(100 * 1024, 64, 2)
    assert (blocks.block_r, blocks.block_c) == (64, 200)
    assert blocks.working_set_words == (2 * 200 + 64) * 64 + 64 * 200 == 42_496 <= 51_200
    # 64 KiB of f32 = 16384 words, d = 128: Bc = 32, Br = 32.
    assert flash_attention_blocks(65_536, 128, 4)[:2] == (32, 32)
    # M = 17 words, d = 4: the rule's Bc = 2 needs 28 words, so Bc drops to 1 (13 words).
    assert flash_attention_blocks(17 * 4, 4, 4) == (1, 1, 13)
    with pytest.raises(TiermapError, match="needs 13 words"):
        flash_attention_blocks(12 * 4, 4, 4)


def test_matmul_bound_formula() -> None:
    # M = 4096 words (√M = 64): 2·1024³/64 + 1024² words of 4 bytes.
    assert matmul_io_lower_bound_bytes(1024, 1024, 1024, 4 * 4096, 4) == pytest.approx(
        4 * (2 * 1024**3 / 64 + 1024**2))
    # A tiny matmul in a huge memory: the compulsory traffic is the bound.
    assert matmul_io_lower_bound_bytes(8, 8, 8, 1e9, 4) == matmul_compulsory_bytes(8, 8, 8, 4)
    assert matmul_compulsory_bytes(8, 8, 8, 4) == 4 * 3 * 64
    assert tiled_matmul_traffic_bytes(64, 32, 16, 8, 4, 2) == 2 * (64 * 32 * 16 * (1 / 8 + 1 / 4)
                                                                  + 64 * 32)
    with pytest.raises(TiermapError, match="positive"):
        matmul_io_lower_bound_bytes(0, 8, 8, 1e6, 4)


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 4096), n=st.integers(1, 4096), k=st.integers(1, 4096),
       words=st.integers(3, 1 << 22))
def test_square_tiles_never_beat_the_matmul_bound(m: int, n: int, k: int, words: int) -> None:
    tile = max(1, min(math.isqrt(words), m, n))
    bound = matmul_io_lower_bound_bytes(m, n, k, 4 * words, 4)
    assert bound >= matmul_compulsory_bytes(m, n, k, 4)
    assert tiled_matmul_traffic_bytes(m, n, k, tile, tile, 4) >= bound * (1 - 1e-12)


def test_attention_bound_regimes() -> None:
    n, d = 1024, 64
    # M = 4096 words ≥ d² = 4096: N²d²/M words.
    assert attention_io_lower_bound_bytes(n, d, 4 * 4096, 4) == pytest.approx(
        4 * n * n * d * d / 4096)
    # M = 1024 < d²: N²d/√M words.
    assert attention_io_lower_bound_bytes(n, d, 4 * 1024, 4) == pytest.approx(
        4 * n * n * d / 32)
    # The two regimes meet at M = d² (both give N²).
    assert attention_io_lower_bound_bytes(n, d, 4 * d * d, 4) == pytest.approx(4 * n * n)
    # Large memory: never below compulsory 4Nd, per head.
    assert attention_io_lower_bound_bytes(n, d, 4 * 2**30, 4, batch_heads=3) == (
        attention_compulsory_bytes(n, d, 4, batch_heads=3))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8192), d=st.sampled_from([16, 32, 64, 128]),
       words=st.integers(4096, 1 << 20))
def test_flash_attention_traffic_respects_the_bound(n: int, d: int, words: int) -> None:
    blocks = flash_attention_blocks(2 * words, d, 2)
    assert flash_attention_working_set_words(d, blocks.block_r, blocks.block_c) <= words
    traffic = flash_attention_traffic_bytes(n, d, blocks.block_r, blocks.block_c, 2)
    assert traffic >= attention_io_lower_bound_bytes(n, d, 2 * words, 2) * (1 - 1e-12)
    assert traffic >= attention_compulsory_bytes(n, d, 2)


def test_flash_attention_traffic_by_hand() -> None:
    # N = 1024, d = 64, Bc = 192: Tc = 6 KV blocks; 2Nd + 6·(3Nd + 4N) words of 2 bytes.
    assert flash_attention_traffic_bytes(1024, 64, 64, 192, 2) == 2 * (
        2 * 1024 * 64 + 6 * (3 * 1024 * 64 + 4 * 1024))
    # FlashAttention's point: far less than unfused attention (the paper: 40.3 GB vs 4.4 GB for
    # GPT-2 medium forward + backward on an A100).
    blocks = flash_attention_blocks(96 * 1024, 64, 2)
    flash = flash_attention_traffic_bytes(1024, 64, blocks.block_r, blocks.block_c, 2)
    assert unfused_attention_traffic_bytes(1024, 64, 2) > 4 * flash


def test_softmax_and_elementwise_traffic() -> None:
    assert softmax_passes("three-pass") == (3, 1)
    assert softmax_passes("two-pass") == (2, 1)
    assert softmax_traffic_bytes(8, 1024, 4, "three-pass") == 4 * 8 * 1024 * 4
    assert softmax_traffic_bytes(8, 1024, 4, "two-pass") == 4 * 8 * 1024 * 3
    with pytest.raises(TiermapError, match="unknown softmax"):
        softmax_passes("one-pass")
    assert elementwise_traffic_bytes(1000, 2, 4) == 12_000
    assert reduction_traffic_bytes(64 * 128, 64, 4) == 4 * (64 * 128 + 64)


def test_program_bound_by_hand() -> None:
    tgt = two_tier_target()
    # 4000 B in, 4000 B out, both fit in 'fast': 4000/1e12 + 4000/5e11 + overhead.
    p = chain_program([4000, 4000], [0.0])
    assert program_lower_bound_s(p, tgt) == pytest.approx(4e-9 + 8e-9 + OVERHEAD_S)
    # A 2 MB input cannot be in the 1 MiB 'fast' tier: it is read at 'slow' speed.
    p = chain_program([2_000_000, 4000], [0.0])
    assert program_lower_bound_s(p, tgt) == pytest.approx(2e-5 + 8e-9 + OVERHEAD_S)
    # Compute-bound: 1e7 flops = 10 µs.
    p = chain_program([4000, 4000], [1e7])
    assert program_lower_bound_s(p, tgt) == pytest.approx(1e-5 + OVERHEAD_S)


def test_program_bound_shares_capacity_among_an_ops_tensors() -> None:
    """Two 600 kB inputs and a 600 kB output cannot all sit in the 1 MiB fast tier at once."""
    from tiermap.ir.program import Op, Program, TensorType, Value

    t = TensorType((150_000,), "f32")
    values = {"a": Value("a", t, -1), "b": Value("b", t, -1), "c": Value("c", t, 0)}
    op = Op("op0", "stablehlo.add", 0, ("a", "b"), ("c",), flops=150_000.0,
            bytes_read=1_200_000, bytes_written=600_000, attrs={"compute_dtype": "f32"})
    p = Program("add", (op,), values, ("a", "b"), ("c",))
    tgt = two_tier_target()
    bound = program_lower_bound_s(p, tgt)
    # Fractional knapsack: 1 MiB moves at 1e12 B/s, the other 751424 B at 1e11 B/s.
    assert bound == pytest.approx(1_048_576 / 1e12 + 751_424 / 1e11 + OVERHEAD_S)
    best = min(
        evaluate(p, tgt, {v: [Residency(tiers[i], 0, 0)] for i, v in enumerate("abc")}, []
                 ).predicted_time_s
        for tiers in [(x, y, z) for x in ("fast", "slow") for y in ("fast", "slow")
                      for z in ("fast", "slow")]
        if sum(1 for x in tiers if x == "fast") <= 1)
    assert best >= bound
    assert best == pytest.approx(1.2e-5 + 1.2e-6 + OVERHEAD_S)  # inputs slow, output fast


def test_everything_in_slow_is_no_better_than_the_bound() -> None:
    p = chain_program([4000, 8000, 2_000_000, 100], [10.0, 1e6, 0.0])
    tgt = two_tier_target()
    ev = evaluate(p, tgt, everywhere(p, "slow"), [])
    assert ev.predicted_time_s >= program_lower_bound_s(p, tgt)


def _spread_lengths(m: int) -> list[int]:
    """The lengths `best_spread_span` tries: 1, 2, ... growing by SPREAD_CLASS_RATIO, and m."""
    out, length = {m}, 1
    while length < m:
        out.add(length)
        length = max(length + 1, int(length * SPREAD_CLASS_RATIO))
    return sorted(out)


@settings(max_examples=300, deadline=None)
@given(op_us=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 8.0, 40.0]), min_size=1,
                      max_size=60),
       transfer_us=st.sampled_from([0.25, 1.0, 3.0, 10.0, 35.0, 200.0]))
def test_best_spread_span_is_the_brute_force_optimum(op_us: list[float],
                                                     transfer_us: float) -> None:
    """Against every run of every length tried: the least added time, ties to the longest run,
    then the earliest."""
    op_s = np.array(op_us) * 1e-6
    transfer_s = transfer_us * 1e-6
    m = len(op_s)
    runs = []
    for length in _spread_lengths(m):
        for start in range(m - length + 1):
            added_s = float(np.maximum(transfer_s / length - op_s[start:start + length],
                                       0.0).sum())
            runs.append((added_s, -length, start))
    added_s, neg_length, start = min(runs)
    first, last, got_s = best_spread_span(transfer_s, op_s)
    assert got_s == pytest.approx(added_s, rel=1e-9, abs=1e-18)
    if added_s == 0.0:  # exact ties only where nothing is added: then the run is determined
        assert (first, last) == (start, start - neg_length - 1)

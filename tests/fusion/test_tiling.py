"""tiermap.fusion.tiling: traffic by hand, the search against brute force and FA-1's rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tiermap.costmodel import io_bounds as bounds
from tiermap.errors import TiermapError
from tiermap.fusion.tiling import (
    fa1_forward_traffic_bytes,
    forward_traffic_bytes,
    forward_working_set_words,
    legal_block_sizes,
    matmul_traffic_bytes,
    search_backward_tiles,
    search_forward_tiles,
    search_matmul_tiles,
    tile_budget_bytes,
)
from tiermap.hardware.loader import load_target


def test_legal_sizes() -> None:
    assert legal_block_sizes(100).tolist() == [16, 32, 48, 64, 80, 96, 100]
    assert legal_block_sizes(8).tolist() == [8]  # shorter than one 16-row block: one block
    assert 321 in legal_block_sizes(1024, (321,)).tolist()


def test_forward_traffic_by_hand() -> None:
    # N = 64, d = 8, Br = 16, Bc = 32, 1-byte words: q-outer reads Q and writes O once (2·64·8)
    # and K, V once per query block: 4 blocks × 64 rows × 16 = 4096.
    assert forward_traffic_bytes(64, 64, 8, 8, 16, 32, True, 1.0) == 2 * 64 * 8 + 4 * 64 * 16
    # kv-outer: K, V once (64·16) + per key block (2) every row: Q (8) + O read/write (16) + l, m
    # read/write (4) = 28 words per row.
    assert forward_traffic_bytes(64, 64, 8, 8, 16, 32, False, 1.0) == 64 * 16 + 2 * 64 * 28
    # Causal q-outer: query block i reads key blocks up to its last row.
    rows = sum(min(64, ((i + 1) * 16 - 1) // 32 * 32 + 32) for i in range(4))
    assert forward_traffic_bytes(64, 64, 8, 8, 16, 32, True, 1.0, causal=True) == (
        2 * 64 * 8 + 16 * rows)


def test_kv_outer_matches_the_bounds_module() -> None:
    for n, d, br, bc in [(1024, 64, 64, 321), (4096, 128, 128, 161), (1000, 64, 7, 33)]:
        mine = forward_traffic_bytes(n, n, d, d, br, bc, False, 2.0)
        assert mine == pytest.approx(bounds.flash_attention_traffic_bytes(n, d, br, bc, 2.0))


def test_search_is_the_brute_force_optimum() -> None:
    nq = nk = 96
    d = 8
    fast = 2000  # words of 1 byte
    best = min(
        (forward_traffic_bytes(nq, nk, d, d, br, bc, qo, 1.0), 0 if qo else 1)
        for br, bc, qo in itertools.product(range(1, 97), range(1, 97), (True, False))
        if forward_working_set_words(br, bc, d, d) <= fast
        and br in legal_block_sizes(nq) and bc in legal_block_sizes(nk))
    t = search_forward_tiles(nq, nk, d, d, fast, 1.0)
    assert t.traffic_bytes == best[0]
    assert forward_working_set_words(t.block_q, t.block_k, d, d) <= fast
    assert t.q_outer


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1024, 2048, 4096, 8192, 16384])
def test_never_above_flash_attention_1_on_a100(n: int, d: int) -> None:
    fast, _ = tile_budget_bytes(load_target("a100"))
    t = search_forward_tiles(n, n, d, d, fast, 2.0)
    ref, _, _ = fa1_forward_traffic_bytes(n, n, d, d, fast, 2.0)
    lower = bounds.attention_io_lower_bound_bytes(n, d, fast, 2.0)
    assert lower <= t.traffic_bytes <= ref
    assert t.working_set_bytes <= fast


def test_gpt2_medium_forward_backward_under_the_paper() -> None:
    # FlashAttention paper, Fig. 2: GPT-2 medium, batch 64, 16 heads, N = 1024, d = 64, fp16,
    # A100: 4.4 GB of HBM traffic measured for forward + backward.
    fast, _ = tile_budget_bytes(load_target("a100"))
    bh = 64 * 16
    fwd = search_forward_tiles(1024, 1024, 64, 64, fast, 2.0, with_lse=True, batch_heads=bh)
    bwd = search_backward_tiles(1024, 1024, 64, 64, fast, 2.0, batch_heads=bh)
    assert fwd.traffic_bytes + bwd.traffic_bytes <= 4.4e9


def test_backward_reads_are_consistent() -> None:
    b = search_backward_tiles(512, 512, 64, 64, 64_000, 2.0)
    assert b.q_reads >= 1 and b.kv_reads >= 1 and b.do_reads >= b.q_reads


def test_too_small_a_budget_is_an_error() -> None:
    with pytest.raises(TiermapError, match="cannot hold"):
        search_forward_tiles(64, 64, 128, 128, 100, 2.0)


def test_matmul_tiles_by_hand() -> None:
    # 64×64×64 with 1-byte words and room for 32×32 tiles: A read twice, B read twice.
    assert matmul_traffic_bytes(64, 64, 64, 32, 32, 1.0) == 64 * 64 * 2 + 64 * 64 * 2 + 64 * 64
    t = search_matmul_tiles(64, 64, 64, 64 * 64 + 16 * 128, 1.0)
    assert (t.tile_m, t.tile_n) == (64, 64)  # everything fits: compulsory traffic
    assert t.traffic_bytes == 3 * 64 * 64
    big = search_matmul_tiles(4096, 4096, 4096, 164_000, 2.0)
    lb = bounds.matmul_io_lower_bound_bytes(4096, 4096, 4096, 164_000, 2.0)
    assert lb <= big.traffic_bytes <= 1.2 * lb
    assert np.isclose(big.working_set_bytes / 2.0,
                      big.tile_m * big.tile_n + 16 * (big.tile_m + big.tile_n))

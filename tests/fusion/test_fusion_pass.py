"""tiermap/fusion/fuse.py: the MIP's choices, group invariants and the plans built on them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fusion.helpers import hand_attention, jax_attention, sds
from tiermap.frontend.lowering import lower
from tiermap.fusion.fuse import Candidate, FusePass, _Index, fuse, select
from tiermap.fusion.tiling import tile_budget_bytes
from tiermap.hardware.loader import load_target
from tiermap.ir.fusion import Fusion
from tiermap.pipeline import plan

A100 = load_target("a100")


def check_groups(program, fusion: Fusion, target) -> None:
    """Disjoint, convex groups within budget; internal tensors read only inside (or by the
    paired backward, which recomputes them)."""
    budget, _ = tile_budget_bytes(target)
    index = _Index(program)
    seen: set[str] = set()
    by_id = {g.id: g for g in fusion.groups}
    for g in fusion.groups:
        ops = frozenset(g.op_ids)
        assert not ops & seen, g.id
        seen |= ops
        assert g.working_set_bytes <= budget, (g.id, g.working_set_bytes)
        assert index.convex(ops), g.id
        partner = by_id.get(f"{g.id}_bwd")
        allowed = ops | (frozenset(partner.op_ids) if partner else frozenset())
        for vid in g.internal:
            assert vid not in program.outputs
            assert all(r.id in allowed for r in index.readers[vid]), (g.id, vid)


def test_attention_is_one_group_with_tiles() -> None:
    args = (sds((2, 256, 4, 64), jnp.float16),) * 3
    prog = lower(jax_attention(causal=True), *args, platform="cuda")
    fusion = fuse(prog, A100)
    check_groups(prog, fusion, A100)
    attn = next(g for g in fusion.groups if g.kind == "attention")
    assert attn.id == "attn0" and attn.attrs["causal"]
    tile = next(t for t in fusion.tiles if t.group == "attn0")
    assert tile.lower_bound_bytes <= tile.traffic_bytes <= tile.reference_bytes
    assert "status optimal" in fusion.notes[0]


def test_backward_fuses_with_its_forward() -> None:
    args = (sds((128, 64)),) * 3
    grad = jax.grad(lambda *a: jnp.sum(hand_attention(*a) ** 2), argnums=(0, 1, 2))
    prog = lower(grad, *args)
    fusion = fuse(prog, A100)
    check_groups(prog, fusion, A100)
    kinds = {g.id: g.kind for g in fusion.groups}
    assert kinds["attn0"] == "attention" and kinds["attn0_bwd"] == "attention_bwd"
    bwd = next(g for g in fusion.groups if g.id == "attn0_bwd")
    recomputed = [v for v, r in bwd.reads_per_input.items() if r == 0.0]
    assert recomputed  # P is recomputed, not read


def test_matmul_takes_its_bias_and_gelu() -> None:
    def mlp(x, w, b):
        return jax.nn.gelu(x @ w + b)

    prog = lower(mlp, sds((512, 256)), sds((256, 1024)), sds((1024,)), platform="cuda")
    fusion = fuse(prog, A100)
    check_groups(prog, fusion, A100)
    (g,) = fusion.groups
    assert g.kind == "matmul" and set(g.op_ids) == {op.id for op in prog.ops}
    assert any(prog.op(o).kind == "stablehlo.tanh" for o in g.op_ids)
    assert prog.outputs[0] not in g.internal


def test_layernorm_is_one_reduction_group() -> None:
    def ln(x):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-5)

    prog = lower(ln, sds((512, 256)))
    fusion = fuse(prog, A100)
    check_groups(prog, fusion, A100)
    assert [g.kind for g in fusion.groups] == ["reduction"]


def test_rows_too_long_for_the_budget_are_not_fused_as_rows() -> None:
    # A 1-MiB row cannot stay on a 164-KB core: softmax splits at its reductions.
    prog = lower(lambda x: jax.nn.softmax(x, axis=-1), sds((4, 1 << 18)))
    fusion = fuse(prog, A100)
    check_groups(prog, fusion, A100)
    for g in fusion.groups:
        assert g.working_set_bytes <= tile_budget_bytes(A100)[0]


def cand(key: str, ops: set[str], saving_s: float, partner: str | None = None) -> Candidate:
    return Candidate(key, "elementwise", frozenset(ops), frozenset(), {}, 0, saving_s, {},
                     partner)


def test_mip_by_hand() -> None:
    # a{1,2} (3) and b{2,3} (2) overlap; c{3,4} (2): the optimum is a + c = 5, not b alone.
    sel = select([cand("a", {"1", "2"}, 3.0), cand("b", {"2", "3"}, 2.0),
                  cand("c", {"3", "4"}, 2.0)], 5.0, 0, 1)
    assert sorted(sel.chosen) == ["a", "c"] and sel.status == "optimal"
    assert sel.objective_s == pytest.approx(5.0)


def test_mip_keeps_forward_and_backward_together() -> None:
    # fwd (saving 5) pairs with bwd (0); bwd overlaps x (saving 4): taking fwd means taking bwd.
    sel = select([cand("f", {"1"}, 5.0, "b"), cand("b", {"2"}, 0.0, "f"),
                  cand("x", {"2", "3"}, 4.0)], 5.0, 0, 1)
    assert sorted(sel.chosen) == ["b", "f"]
    sel = select([cand("f", {"1"}, 3.0, "b"), cand("b", {"2"}, 0.0, "f"),
                  cand("x", {"2", "3"}, 4.0)], 5.0, 0, 1)
    assert sel.chosen == ("x",)


def test_planned_attention_verifies_and_names_groups() -> None:
    args = (sds((1, 256, 2, 64), jnp.float16),) * 3
    p = plan(jax_attention(causal=True), *args, target="a100", workers=1, time_limit_s=10)
    p.verify()
    groups = {o.fusion_group for o in p.ops}
    assert "attn0" in groups
    fused = [t for t in p.tensors if not t.materialized]
    assert fused and all(not t.residency for t in fused)
    assert any(t.group == "attn0" and t.kind == "attention" for t in p.tiles)
    assert p.predicted_time_s <= p.baselines["naive"]


def test_fuse_pass_is_a_pass() -> None:
    from tiermap.passes.base import Pass

    assert isinstance(FusePass(), Pass) and FusePass.name == "fuse"


OPS = [jnp.sin, jnp.exp, jnp.tanh, lambda x: x * 2.0, lambda x: x + 1.0, jnp.abs]


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, len(OPS) - 1), min_size=1, max_size=6), st.booleans())
def test_random_chains_plan_and_verify(chain: list[int], reduce_rows: bool) -> None:
    def fn(x):
        y = x
        for i in chain:
            y = OPS[i](y)
        if reduce_rows:
            y = y - y.max(axis=-1, keepdims=True)
        return y

    prog = lower(fn, sds((64, 128)))
    check_groups(prog, fuse(prog, A100, time_limit_s=2.0), A100)
    plan(fn, sds((64, 128)), target="a100", workers=1, time_limit_s=5).verify()


def test_chain_whose_intermediates_a_later_chain_reads_still_fuses() -> None:
    # A forward chain and a "backward" chain that reads its intermediates join into one
    # cluster through those tensors; the path through the sort between them makes that
    # cluster non-convex. The cluster is split, so each chain still runs as one kernel, its
    # intermediates that the later chain reads materialized.
    def fn(x: jax.Array) -> jax.Array:
        a = x * x
        b = a * x
        c = jnp.tanh(b) * 0.5 + 0.5
        d = c * x
        m = jnp.sort(d, axis=0)  # fuses with nothing
        return (m * a + b) * c

    program = lower(fn, sds((256, 256)))
    fusion = fuse(program, A100)
    check_groups(program, fusion, A100)
    index = _Index(program)
    group_of = {o: g for g in fusion.groups for o in g.op_ids}
    mm = next(op for op in program.ops if op.kind == "stablehlo.sort")
    before = [op for op in program.ops if op.step < mm.step and op.kind == "stablehlo.multiply"]
    after = [op for op in program.ops if op.step > mm.step and op.kind == "stablehlo.multiply"]
    assert len(before) >= 3 and len(after) >= 2
    fwd = {group_of.get(op.id) for op in before}
    assert len(fwd) == 1 and None not in fwd  # the forward chain is one group
    (g,) = fwd
    assert g is not None
    # its intermediates read after the sort are materialized, not internal
    read_later = {v for op in after for v in op.inputs if index.producer[v].id in g.op_ids}
    assert read_later and not read_later & set(g.internal)
    assert all(op.id in group_of for op in after)
    plan(fn, sds((256, 256)), target=A100, time_limit_s=5).verify()

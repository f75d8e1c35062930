"""Recomputation: chosen where device memory is short, written into the program, priced,
verified, kept in the plan JSON, and carried out by the applied program."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

import tiermap
from tests.passes.helpers import FAST_BPS, MIB, PEAK_FLOPS_PER_S, program, strip_wall
from tiermap.errors import ChoiceError, InfeasiblePlacementError, PassError
from tiermap.examples.models import transformer_train
from tiermap.hardware.loader import load_target
from tiermap.hardware.target import Target, Tier
from tiermap.ir.plan import Plan
from tiermap.ir.recompute import RECOMPUTE_OF_ATTR
from tiermap.passes.verify import verify_plan
from tiermap.plan_views import Plan as ViewPlan
from tiermap.recompute.select import MIN_IDLE_STEPS


def one_tier(capacity_bytes: int) -> Target:
    """A device with one memory and nowhere to spill to."""
    return Target(name="hand-one-tier", description="one memory, no host tier", platform="tpu",
                  peak_flops_per_s={"f32": PEAK_FLOPS_PER_S}, units=1,
                  tiers=(Tier("fast", capacity_bytes, FAST_BPS, FAST_BPS),))


def held_program(chain: int = 10) -> tiermap.Program:
    """Planned without fusion (the c's would fuse). x (1 MiB) -> a (4 MiB) -> b -> c1 ..
    c<chain> (4 MiB each, one step each) -> y reads a, the last c and x. `a` idles from step 2
    to the end: at its fullest the program needs x + a + two c's = 13 MiB."""
    sizes = {"x": MIB, "a": 4 * MIB, "b": 4 * MIB, "y": MIB}
    ops: list[tuple[list[str], list[str], float]] = [(["x"], ["a"], 1e3), (["a"], ["b"], 1e3)]
    prev = "b"
    for k in range(1, chain + 1):
        sizes[f"c{k}"] = 4 * MIB
        ops.append(([prev], [f"c{k}"], 1e3))
        prev = f"c{k}"
    ops.append((["a", prev, "x"], ["y"], 1e3))
    return program(sizes, ["x"], ops, ["y"], name="held")


def test_recompute_fits_what_does_not_fit_otherwise() -> None:
    prog, target = held_program(), one_tier(12 * MIB)
    with pytest.raises(InfeasiblePlacementError):
        tiermap.plan(prog, target=target, recompute="off", fusion=False)
    plan = tiermap.plan(prog, target=target, fusion=False)
    assert [r.tensor for r in plan.recomputes] == ["a"]
    rc = plan.recomputes[0]
    assert rc.inputs == ("x",) and rc.nbytes == 4 * MIB
    # the repeated op sits just before y, repeats step 0's op and writes the copy y reads
    assert plan.program is not None
    clone = plan.program.ops[rc.step]
    assert clone.attrs[RECOMPUTE_OF_ATTR] == "op0" and clone.outputs == (rc.copy,)
    y_op = plan.program.ops[rc.step + 1]
    assert rc.copy in y_op.inputs and "a" not in y_op.inputs
    assert rc.freed_steps == (2, rc.step - 1) and rc.step - 2 >= MIN_IDLE_STEPS
    # priced as an op: one more add (1e3 flops at 1e12, or its 5 MiB of traffic at 1e12 B/s)
    base = tiermap.plan(prog, target=one_tier(64 * MIB), fusion=False)
    assert not base.recomputes
    assert plan.predicted_time_s == pytest.approx(
        base.predicted_time_s + 5 * MIB / FAST_BPS, rel=1e-9)
    assert any(n.startswith("recompute: 1 tensor") for n in plan.notes)
    verify_plan(plan)


def test_recompute_fit_and_auto_agree_without_a_host_tier() -> None:
    prog, target = held_program(), one_tier(12 * MIB)
    auto = tiermap.plan(prog, target=target, recompute="auto", fusion=False)
    fit = tiermap.plan(prog, target=target, recompute="fit", fusion=False)
    assert strip_wall(auto.to_json()) == strip_wall(fit.to_json())


def test_recompute_mode_is_checked() -> None:
    with pytest.raises(ChoiceError, match="recompute"):
        tiermap.plan(held_program(), target=one_tier(12 * MIB), recompute="always")


def _tampered(plan: Plan, **changes: object) -> Plan:
    return dataclasses.replace(plan, **changes)  # type: ignore[arg-type]


def test_verifier_checks_recomputations() -> None:
    plan = tiermap.plan(held_program(), target=one_tier(12 * MIB), fusion=False)
    rc = plan.recomputes[0]
    # the repeated op reads something else than its original did (c10, resident then)
    ops = tuple(dataclasses.replace(o, inputs=("c10",)) if o.id == rc.op_ids[0] else o
                for o in plan.ops)
    with pytest.raises(PassError, match="reads c10 where op0 read x"):
        verify_plan(_tampered(plan, ops=ops))
    # a reader after the recomputation still reads the dropped tensor
    reader = plan.ops[rc.step + 1]
    ops = tuple(dataclasses.replace(o, inputs=tuple("a" if v == rc.copy else v
                                                     for v in o.inputs))
                if o.id == reader.id else o for o in plan.ops)
    with pytest.raises(PassError, match="reads the dropped tensor"):
        verify_plan(_tampered(plan, ops=ops))
    # the record says it repeats an op of another kind, or a later one
    bad = dataclasses.replace(rc, of_ops=(reader.id,))
    with pytest.raises(PassError, match="not before it|does not repeat"):
        verify_plan(_tampered(plan, recomputes=(bad,)))


def test_recomputes_round_trip_and_old_plans_read() -> None:
    plan = tiermap.plan(held_program(), target=one_tier(12 * MIB), fusion=False)
    back = ViewPlan.from_json(plan.to_json())
    assert back.recomputes == plan.recomputes
    old = json.loads(plan.to_json())
    old.pop("recomputes")
    assert ViewPlan.from_dict(old).recomputes == ()


def test_recompute_with_a_host_tier_weighs_offload() -> None:
    """Where a host tier takes the idle tensor for free (its moves hide behind the compute:
    1 ms an op, 84 us for both moves, while its recomputation would cost 1 ms), nothing is
    recomputed; where the link is too slow to hide them, the tensor is recomputed."""
    prog = held_program()
    fast = Target(name="hand-host", description="a device and a host", platform="tpu",
                  peak_flops_per_s={"f32": 1e6}, units=1,
                  tiers=(Tier("fast", 12 * MIB, FAST_BPS, FAST_BPS),
                         Tier("host", 1 << 30, 1e11, 1e11)))
    assert not tiermap.plan(prog, target=fast, fusion=False).recomputes
    slow = dataclasses.replace(fast, peak_flops_per_s={"f32": 1e12},
                               tiers=(fast.tiers[0], Tier("host", 1 << 30, 1e8, 1e8)))
    mixed = tiermap.plan(prog, target=slow, fusion=False)
    assert [r.tensor for r in mixed.recomputes] == ["a"]
    offload = tiermap.plan(prog, target=slow, recompute="off", fusion=False)
    assert offload.predicted_time_s > mixed.predicted_time_s


# --- the applied program -----------------------------------------------------------------------


def _small_cpu(capacity_bytes: int) -> Target:
    base = load_target("cpu")
    tiers = tuple(dataclasses.replace(t, capacity_bytes=capacity_bytes) if t.name == "dram"
                  else t for t in base.tiers)
    return dataclasses.replace(base, name="cpu-small", tiers=tiers)


def _real(specs: object) -> object:
    leaves, tree = jax.tree.flatten(specs)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    out = [jax.random.randint(k, s.shape, 0, 100, s.dtype) if jnp.issubdtype(s.dtype, jnp.integer)
           else (0.02 * jax.random.normal(k, s.shape)).astype(s.dtype)
           for s, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, out)


def test_applied_training_step_recomputes_as_planned() -> None:
    fn, specs = transformer_train(layers=2, d_model=64, heads=2, seq=128, batch=4)
    args = _real(specs)
    jitted = tiermap.jit(fn, target=_small_cpu(10 * MIB), time_limit_s=20)
    lowered = jitted.lower(*args)
    plan = lowered.plan()
    assert len(plan.recomputes) >= 5
    done = [d for d in lowered.decisions() if d.kind == "recompute"]
    assert len(done) == len(plan.recomputes) and all(d.applied for d in done), [
        d.detail for d in done if not d.applied]
    out, ref = jitted(*args), jax.jit(fn)(*args)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-5)
    # the repeated equations sit behind barriers, and XLA kept them (did not merge them with
    # the originals): its optimised program has more products and multiplies than jax.jit's
    assert lowered.lowered().as_text().count("optimization_barrier") >= len(plan.recomputes) // 2
    hlo = lowered.compile().as_text()
    plain = jax.jit(fn).lower(*args).compile().as_text()
    assert hlo.count(" dot(") + hlo.count(" multiply(") > (
        plain.count(" dot(") + plain.count(" multiply("))


def test_auto_keeps_the_plan_without_recomputation_where_it_predicts_less() -> None:
    """A case hypothesis found (tests/placement/test_property.py): on two equal-speed tiers
    the recomputing plan predicted more than the one that only spills, so greedy came out
    above naive. "auto" now also plans without recomputation and keeps the faster, so
    mip <= greedy <= naive holds again."""
    def loss(x: jax.Array) -> jax.Array:
        y = x * (x * x)
        return jnp.sum(jnp.tanh(y)) + jnp.sum(y * y)

    prog = tiermap.lower(jax.value_and_grad(loss), jax.ShapeDtypeStruct((128, 128), jnp.float32))
    bw = 1e11
    target = Target(name="two-equal-tiers", description="hypothesis' target", platform="tpu",
                    peak_flops_per_s={"f32": 1e11}, units=1,
                    tiers=(Tier("t0", 196614, bw, bw), Tier("t1", 790552, bw, bw)))
    got = {s: tiermap.plan(prog, target=target, strategy=s, time_limit_s=2, fusion=False)
           for s in ("naive", "greedy", "mip")}
    assert got["greedy"].predicted_time_s <= got["naive"].predicted_time_s * (1 + 1e-9)
    assert got["mip"].predicted_time_s <= got["greedy"].predicted_time_s * (1 + 1e-9)
    for p in got.values():
        verify_plan(p, prog)


def test_a_chain_may_read_a_later_copy_than_its_original_op() -> None:
    """X is recomputed twice (before steps 10 and 20); Y = P(X) is recomputed before step 30,
    so the repeated P reads X's second copy where the original P (at step 10) read the first.
    Both are copies of X: the verifier accepts it (found on a flax 8-layer training step on
    h100-4g, where planning failed with "reads t11578~rc50 where op11264 read t11578~rc49")."""
    from tiermap.recompute.select import Candidate
    from tiermap.recompute.transform import rewrite

    sizes = {"x": MIB, "X": 4 * MIB, "Y": 4 * MIB, "Z": MIB, "out": MIB}
    ops: list[tuple[list[str], list[str], float]] = [(["x"], ["X"], 1e3)]
    prev = "x"
    for k in range(1, 10):
        sizes[f"f{k}"] = MIB
        ops.append(([prev], [f"f{k}"], 1e3))
        prev = f"f{k}"
    ops.append((["X", "f9"], ["Y"], 1e3))  # step 10: P
    prev = "Y"
    for k in range(1, 10):
        sizes[f"g{k}"] = MIB
        ops.append(([prev if k > 1 else "f9"], [f"g{k}"], 1e3))
        prev = f"g{k}"
    ops.append((["X", "g9"], ["Z"], 1e3))  # step 20
    prev = "Z"
    for k in range(1, 10):
        sizes[f"h{k}"] = MIB
        ops.append(([prev], [f"h{k}"], 1e3))
        prev = f"h{k}"
    ops.append((["Y", "h9", "f9"], ["out"], 1e3))  # step 30
    prog = program(sizes, ["x"], ops, ["out"], name="copies")
    chosen = [Candidate("X", 10, (1, 9), (0,), ("x",), 4 * MIB, 0.0),
              Candidate("X", 20, (11, 19), (0,), ("x",), 4 * MIB, 0.0),
              Candidate("Y", 30, (11, 29), (10,), ("X", "f9"), 4 * MIB, 0.0)]
    rewritten = rewrite(prog, chosen)
    p_clone = rewritten.ops[rewritten.recomputes[2].step]
    p_orig = rewritten.ops[int(rewritten.recomputes[2].of_ops[0][2:])]
    assert p_clone.inputs[0] != p_orig.inputs[0]  # two different copies of X
    plan = tiermap.plan(rewritten, target=one_tier(256 * MIB), recompute="off", fusion=False)
    assert len(plan.recomputes) == 3
    verify_plan(plan)

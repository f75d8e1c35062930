"""A target whose per-core scratch cannot hold one tile still plans: nothing is fused or tiled,
and the plan's notes say why."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import tiermap


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.softmax(q @ k.T, axis=-1) @ v


def test_scratch_too_small_for_any_tile_leaves_groups_unfused() -> None:
    h100 = tiermap.target("h100")
    tiers = tuple(dataclasses.replace(t, capacity_bytes=1024 * h100.units) if t.per_unit else t
                  for t in h100.tiers)
    tiny = dataclasses.replace(h100, name="h100-1k-smem", tiers=tiers)
    s = jax.ShapeDtypeStruct((256, 64), jnp.float32)
    plan = tiermap.plan(_attention, s, s, s, target=tiny, time_limit_s=5)
    plan.verify()
    assert not plan.tiles
    assert all(op.fusion_group is None for op in plan.ops)
    assert any("no matmul tile fits" in n or "left unfused" in n for n in plan.notes)
    # The same program on the real h100 fuses and tiles the attention.
    full = tiermap.plan(_attention, s, s, s, target=h100, time_limit_s=5)
    assert full.tiles and full.predicted_time_s <= plan.predicted_time_s
    assert any(n.startswith("fuse:") for n in full.notes)

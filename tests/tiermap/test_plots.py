"""Charts: each is a Figure, renders without a display, and saves a non-empty PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiermap.tiermap_fakes import fake_plan
from tiermap import plots, sweep
from tiermap.errors import ChoiceError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("make", [plots.roofline, plots.occupancy, plots.placement_timeline])
def test_each_chart_renders_to_png(make) -> None:  # type: ignore[no-untyped-def]
    data = plots.png_bytes(make(fake_plan()))
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_traffic_comparison_takes_several_plans() -> None:
    by_name = {"naive": fake_plan("naive", 2.0), "greedy": fake_plan("greedy", 1.3),
               "mip": fake_plan()}
    fig = plots.traffic_comparison(by_name)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sram", "hbm", "ddr"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("naive") and labels[2].startswith("mip")
    # a sequence of plans is keyed by strategy
    assert len(plots.traffic_comparison(list(by_name.values())).axes[0].patches) == 9


def test_save_plots_writes_every_chart(tmp_path: Path) -> None:
    written = plots.save_plots(fake_plan(), tmp_path / "charts",
                               compare={"naive": fake_plan("naive", 2.0)})
    assert sorted(written) == sorted(plots.PLOT_FILES)
    for path in written.values():
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert path.stat().st_size > 5_000


def test_with_capacity_changes_one_tier_only() -> None:
    plan = fake_plan()
    small = sweep.with_capacity(plan.target, "sram", 1 << 20)
    assert small.tier("sram").capacity_bytes == 1 << 20
    assert small.tier("hbm") == plan.target.tier("hbm")
    assert small.name == "sn40l@sram=1.00MiB"
    with pytest.raises(KeyError, match="no tier 'l9'"):
        sweep.with_capacity(plan.target, "l9", 1)


def test_figures_do_not_use_pyplot_state() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.roofline(fake_plan())
    assert plt.get_fignums() == before


def test_attention_traffic_chart_draws_flash_against_the_bound() -> None:
    fig = plots.attention_traffic(n=256, d=32, fast_bytes=64 * 1024, targets=("a100",))
    left, right = fig.axes[:2]
    labels = [t.get_text() for t in left.get_legend().get_texts()]
    assert any(label.startswith("IO lower bound") for label in labels)
    assert any(label.startswith("FlashAttention rule: Bc=") for label in labels)
    assert plots.png_bytes(fig).startswith(PNG_MAGIC)


def test_loops_get_a_chart_of_one_iteration(tmp_path: Path) -> None:
    import jax
    import jax.numpy as jnp

    import tiermap

    def rnn(ws: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    plan = tiermap.plan(rnn, jnp.ones((3, 32, 32)), jnp.ones((8, 32)), target="h100",
                        time_limit_s=5)
    (loop,) = plan.loops
    fig = plots.loop_iteration(plan, loop.op_id)
    assert "one iteration of 3" in fig.axes[0].get_title()
    written = plots.save_plots(plan, tmp_path)
    assert f"loop_{loop.op_id}.png" in written
    with pytest.raises(ChoiceError, match="no loop"):
        plots.loop_iteration(plan, "op999")

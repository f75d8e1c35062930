"""Where every tensor lives at every step: the segment form every strategy shares (segments.py,
problem.py), its incremental scorer (cost_state.py), re-spreading moves (respread.py), the naive
and greedy baselines (baselines.py), the MIP (mip_model.py, mip.py), the `place-tiers` pass
(place_tiers.py) and `build_plan` (build.py)."""

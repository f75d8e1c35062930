"""tiermap's compiler passes, one per file; the PassManager (base.py) runs them in order.

- `schedule` (schedule.py): the op order (the frontend's, checked topological).
- `liveness` (liveness.py): live ranges and live bytes per step.
- `fuse`, `tile` (fusion.py, tiling.py): fusion groups and their tiles.
- `place-tiers` (place_tiers.py): where every tensor lives at every step (the MIP; the "naive"
  and "greedy" strategies are in baselines.py).
- `verify` (verify.py): the independent check of the plan.
"""

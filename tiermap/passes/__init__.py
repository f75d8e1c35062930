"""The pass framework and the analyses every strategy needs; the PassManager (manager.py) runs
the passes in order.

- base.py: the pass protocol, `PipelineState` and the analysis results it carries.
- `schedule` (schedule.py): the op order (the frontend's, checked topological).
- `liveness` (liveness.py): live ranges and live bytes per step.
- `verify` (verify.py): the independent check of the plan.

The deciding passes live in their own folders: `fuse` and `tile` in tiermap/fusion/,
`place-tiers` in tiermap/placement/.
"""

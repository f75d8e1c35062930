"""Small hand-built Plans, so reports, plots and traces are tested apart from the solver."""

from __future__ import annotations

from tiermap import Plan
from tiermap.hardware import load_target
from tiermap.ir.plan import (
    OpPlan,
    Residency,
    SolverInfo,
    TensorPlan,
    TileChoice,
    Transfer,
)

MIB = 1 << 20


def fake_plan(strategy: str = "mip", scale: float = 1.0) -> Plan:
    """A 4-step plan on sn40l: a weight streamed DDR → HBM, a fused pair, one eviction.

    Steps: 0 dot(x, w) -> h; 1 exp(h) -> e (fused with 2); 2 reduce(e) -> r; 3 add(r, x) -> y.
    """
    target = load_target("sn40l")
    t = (
        TensorPlan("t0", (64, 1024), "f32", 256 * 1024, -1, 3, True,
                   (Residency("hbm", 0, 3),)),
        TensorPlan("t1", (1024, 1024), "f32", 4 * MIB, -1, 0, True,
                   (Residency("ddr", 0, 0),)),
        TensorPlan("t2", (64, 1024), "f32", 256 * 1024, 0, 1, True,
                   (Residency("hbm", 0, 1), Residency("ddr", 1, 1))),
        TensorPlan("t3", (64, 1024), "f32", 256 * 1024, 1, 2, False, ()),
        TensorPlan("t4", (64,), "f32", 256, 2, 3, True, (Residency("hbm", 2, 3),)),
        TensorPlan("t5", (64, 1024), "f32", 256 * 1024, 3, 3, True, (Residency("hbm", 3, 3),)),
    )
    ops = (
        OpPlan("op0", "stablehlo.dot_general", 0, 2 * 64 * 1024 * 1024 * scale,
               ("t0", "t1"), ("t2",), None, 4.2e-5 * scale,
               {"ddr": 4 * MIB, "hbm": 512 * 1024}, compute_time_s=1e-6),
        OpPlan("op1", "stablehlo.exponential", 1, 64 * 1024, ("t2",), ("t3",), "fuse0",
               1.6e-7 * scale, {"hbm": 256 * 1024}),
        OpPlan("op2", "stablehlo.reduce", 2, 64 * 1024, ("t3",), ("t4",), "fuse0",
               1e-8 * scale, {"hbm": 256}),
        OpPlan("op3", "stablehlo.add", 3, 64 * 1024, ("t4", "t0"), ("t5",), None,
               3.3e-7 * scale, {"hbm": 512 * 1024 + 256}),
    )
    transfers = (Transfer("t2", "hbm", "ddr", 1, 1, 256 * 1024),)
    traffic = {"sram": 0.0, "hbm": 1.28e6 * scale, "ddr": 4.45e6 * scale}
    return Plan(
        program_name="toy", num_steps=4, target=target, strategy=strategy, ops=ops, tensors=t,
        transfers=transfers, predicted_time_s=4.6e-5 * scale, lower_bound_s=4.2e-5,
        traffic_bytes=traffic, baselines={"naive": 9.0e-5, "greedy": 5.0e-5},
        solver=SolverInfo("highs", "optimal", 0.0, 0.12, 5.0, seed=0),
        tiles=(TileChoice("fuse0", "softmax", {"block_rows": 16}, 2.6e5, 2.5e5),),
        notes=("hand-built for tests",),
    )

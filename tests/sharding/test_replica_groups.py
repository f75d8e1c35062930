"""HLO replica groups written out as explicit lists (the converter fallback)."""

from __future__ import annotations

from tiermap.frontend.partitioned import explicit_replica_groups


def test_iota_and_mesh_groups_are_listed() -> None:
    assert explicit_replica_groups("replica_groups=[2,4]<=[8], x") == (
        "replica_groups={{0,1,2,3},{4,5,6,7}}, x")
    assert explicit_replica_groups("replica_groups=[4,2]<=[2,4]T(1,0) y") == (
        "replica_groups={{0,4},{1,5},{2,6},{3,7}} y")
    assert explicit_replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}, z") == (
        "replica_groups={{0,4},{1,5},{2,6},{3,7}}, z")
    assert explicit_replica_groups("replica_groups=mesh['a'=1,'b'=8] {'b'}") == (
        "replica_groups={{0,1,2,3,4,5,6,7}}")
    kept = "replica_groups={{0,1}}"
    assert explicit_replica_groups(kept) == kept

"""Hardware targets: the schema-v1 dataclasses, the strict TOML loader and the built-in targets."""

from tiermap.hardware.loader import (
    builtin_target_names,
    dumps_target,
    load_target,
    loads_target,
    target_from_dict,
)
from tiermap.hardware.target import Link, Target, Tier

__all__ = [
    "Link",
    "Target",
    "Tier",
    "builtin_target_names",
    "dumps_target",
    "load_target",
    "loads_target",
    "target_from_dict",
]

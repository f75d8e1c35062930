"""What the attention matcher hands the rewriter: an `AttentionMatch` (with its bias and mask
inputs, `Side`), and `NoMatch`, raised where a candidate is not an attention it can replace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Side:
    """A side input of the logits (bias or mask): a jaxpr var or a concrete array, with the
    score label of each of its dims (None where it broadcasts)."""

    value: Any
    labels: tuple[int | None, ...]
    concrete: bool


@dataclass
class AttentionMatch:
    """One attention found in a jaxpr, with everything the kernel call needs.

    Attributes:
        d1, d2: indices of the two dot_general equations.
        region: indices of the equations the kernel replaces (D1 … D2).
        q, k, v: the jaxpr vars in the Q, K and V roles; *_labels: their dims' labels.
        sides: bias and mask inputs; steps: the logits transform (sides by index).
        label_role, label_size: per label: "b" batch, "q" query, "k" key, "d" head,
            "e" value head, "u" unit; and its size.
        out_labels: labels of D2's output dims.
        q_len, kv_len, head_dim, v_head_dim: sizes (q_len is every query dim together).
    """

    d1: int
    d2: int
    region: frozenset[int]
    q: Any
    k: Any
    v: Any
    q_labels: tuple[int, ...]
    k_labels: tuple[int, ...]
    v_labels: tuple[int, ...]
    sides: list[Side]
    steps: tuple[tuple[Any, ...], ...]
    label_role: list[str]
    label_size: list[int]
    out_labels: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    q_len: int = 0
    kv_len: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    notes: list[str] = field(default_factory=list)
    bwd_region: frozenset[int] = frozenset()
    bwd_at: int = -1
    ct_in: Any = None
    ct_out: dict[Any, tuple[str, ...]] = field(default_factory=dict)


class NoMatch(Exception):
    """Raised inside the matcher when a candidate is not an attention it can replace."""

"""Runnable attention kernels that `tiermap/apply/rewrite.py` substitutes for recognised attention.

`blocked_attention` is a pure-JAX FlashAttention (online softmax over key/value blocks, a
recomputing backward through `jax.custom_vjp`); it runs on every backend. `pallas` wraps JAX's
Pallas flash-attention kernels for GPU and TPU and falls back to the blocked kernel where they do
not apply.
"""

from tiermap.kernels.blocked_attention import (
    LogitsTransform,
    attention_reference,
    blocked_attention,
    flash_attention,
)

__all__ = ["LogitsTransform", "attention_reference", "blocked_attention", "flash_attention"]

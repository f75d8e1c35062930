"""Recomputation: which stored tensors to drop and compute again, and the rewritten program."""

"""Which ops run as one kernel: attention recognised on the IR (attention.py), fusion candidates
and the MIP that selects them, the `fuse` pass (fuse.py), and the `tile` pass with its
FlashAttention and matmul tile searches (tiling.py)."""

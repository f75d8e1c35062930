"""tiermap.placement."""

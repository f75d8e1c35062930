"""tiermap.ir."""

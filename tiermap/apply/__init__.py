"""tiermap.apply."""

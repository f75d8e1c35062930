"""tiermap.bounds."""

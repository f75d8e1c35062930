"""tiermap.frontend."""

"""tiermap.fusion."""

"""Bundled pure-JAX example models (see `examples.models`); not part of the installed package."""

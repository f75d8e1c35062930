"""Bundled pure-JAX example models (`tiermap.examples.models`), shipped with the package so that
notebooks and scripts import them from anywhere."""

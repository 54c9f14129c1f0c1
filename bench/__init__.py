"""Benchmarks: run each from the repository root as ``python -m bench.<script> ...`` (see bench/RESULTS.md)."""

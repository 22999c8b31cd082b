"""Benchmarks: each a `python -m benchmarks.NAME` command that prints figures (and --json)."""

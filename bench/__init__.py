"""Benchmarks: `python -m bench.rollout`."""

"""Benchmarks: each module prints figures; none asserts a time."""

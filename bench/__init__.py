"""Benchmarks: each prints one JSON line of ratios against a baseline measured in the same run.

Run from the repository root: `python -m bench.NAME --help`.
"""

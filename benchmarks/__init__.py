"""Benchmarks: scripts that print tables and ratios measured in the same run."""

"""Versioned bundles in a repository: load, verify, warm, swap, canary and shadow."""

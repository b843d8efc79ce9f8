"""Benchmarks, each against its baselines in the same run, and the baselines' servers."""

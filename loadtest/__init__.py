"""Load generation and benchmark tooling for genserve (not part of the served package)."""

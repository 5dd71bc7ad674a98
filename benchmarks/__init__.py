"""Benchmarks: scripts that print tables (`python -m benchmarks.NAME`). Not timed tests."""

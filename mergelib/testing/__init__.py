"""Fixtures shared by tests, the demo and benchmarks: generated model families on disk (`tiny.py`)."""

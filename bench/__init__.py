"""Benchmarks: scripts run as `.venv/bin/python bench/NAME.py`; a package only so they share bench.common."""

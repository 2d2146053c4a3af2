"""Benchmarks shipped with the package: speed (``speed.py``) and accuracy (``accuracy.py``) studies."""

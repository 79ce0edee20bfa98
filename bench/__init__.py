"""Benchmarks of mogile_middleware against baselines measured in the same run: ``python -m bench``."""

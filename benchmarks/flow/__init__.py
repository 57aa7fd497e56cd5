"""Benchmark of tzk's Glow against normflows 1.7.3: ``python -m benchmarks.flow``."""

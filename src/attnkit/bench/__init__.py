"""Benchmarks: ``attnkit bench`` (quick suite), ``attnkit bench kernels``, ``attnkit bench vit``."""

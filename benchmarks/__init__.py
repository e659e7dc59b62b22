"""Benchmark scripts; importable so device_check reuses their measurements."""

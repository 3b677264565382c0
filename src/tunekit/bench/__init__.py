"""Benchmarks that run tunekit and its peers side by side (see train_bench.py)."""

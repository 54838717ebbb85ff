"""Benchmarks for lisa-kernels, run from the repository root as modules: `python -m benchmarks.bench_adamw`.

`benchmarks.common` is the harness they share (timing, environment, results files, tables).
"""

"""Benchmarks behind ``python -m lampseg bench NAME [overrides]`` (``cli.run_bench``), one module per
benchmark; see docs/BENCHMARKS.md."""

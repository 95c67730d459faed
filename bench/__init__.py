"""Benchmark harness for the pipeline: `python -m bench run|scale|profile` (see bench/README.md)."""

"""Operator benchmarks: `svd bench`, `svd swapbench`, `python -m svd.tools.trtbench`."""

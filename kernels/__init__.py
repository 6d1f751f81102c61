"""Triton kernels (installed as ldeq_fast.kernels): one file per op, kernel + launcher."""

"""Triton kernels (installed as ldeq_fast.kernels): one file per op, kernel + launcher.

Integer arguments that only bound loops or index small vectors (slot, n, k, chunk counts, group sizes) are
``do_not_specialize``: triton compiles another kernel for every value class of a specialised integer (== 1,
a multiple of 16, other), and each compile costs about a second of the GPU machine's time.  Sizes and
strides that decide the alignment of vector loads stay specialised.
"""

"""target="triton": quantized linears run lowbit's Triton kernels through ``lowbit::`` custom ops.

Importing this package does not import Triton; the backend checks for it in ``check_available`` and the
ops import the kernels on their first call.
"""

"""GPU training kernels for LISA fine-tuning.

Importing this package touches no GPU and compiles nothing: Triton kernels compile at their first launch and the
C++ extension builds at first use.
"""

"""Triton where it is installed, and whether its kernels run interpreted on CPU tensors.

Triton reads TRITON_INTERPRET=1 when it decorates a kernel (at import): set it before importing lisa_kernels and
the kernels run on CPU tensors through Triton's interpreter (how the tests check them without a GPU), and only then.
"""

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, or a CPU-only box without Triton: the PyTorch paths do the work.
    triton = tl = None

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"

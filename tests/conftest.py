import os

import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors, so the suite always exercises
# the real kernels. Triton reads this when a kernel is decorated, so it must be set before lisa_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

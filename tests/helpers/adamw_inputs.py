"""What the FusedAdamW tests share: parameters of odd sizes, gradients for several copies of them, and the
optimizer's paths as keyword arguments."""

import torch

SIZES = (0, 1, 3, 257, 70_003)  # 70,003 spans two interpreter blocks and many CUDA blocks
# FusedAdamW's paths: the Triton kernel (on CPU through the interpreter), the default (torch's fused kernel on
# CPU, the Triton kernel on CUDA) and torch _foreach ops.
PATHS = {"kernel": dict(triton_on_cpu=True), "default": {}, "foreach": dict(foreach=True)}


def make_params(device, dtype=torch.float32, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(device, dtype)) for n in sizes]


def set_grads(param_lists, seed, frozen=()):
    g = torch.Generator().manual_seed(seed)
    for i, ps in enumerate(zip(*param_lists)):
        grad = torch.randn(ps[0].shape, generator=g)
        for p in ps:
            p.grad = None if i in frozen else grad.to(p.device, p.dtype)

"""Gradient clipping that takes the input embedding's row-sparse gradient.

With ``nn.Embedding(sparse=True)`` backward gives the embedding a sparse COO gradient: one row of values per token of
the step instead of a vocabulary-sized tensor. At Llama-3-8B that is 1,024 x 4096 x 2 bytes = 8 MB for 1,024 tokens
instead of 128,256 x 4096 x 2 bytes = 1.05 GB. FusedAdamW steps it exactly in the embedding's row-sparse group
(``lisa_kernels.sparse_rows``), so `lisa_trainer.memory` turns it on where that group exists.
``torch.nn.utils.clip_grad_norm_`` cannot take a sparse gradient (no sparse kernel for its norm):
:func:`clip_grad_norm` computes and clips as it does, sparse gradients included.
"""

from __future__ import annotations

import torch
from torch import nn


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The total 2-norm of the parameters' gradients, as ``torch.nn.utils.clip_grad_norm_`` computes it (the norm of
    the per-tensor norms), and, when ``max_norm > 0``, the gradients scaled as it scales them: by
    ``min(1, max_norm / (norm + 1e-6))``. A sparse gradient is coalesced in place (the optimizer would do it
    anyway) and counts by its values. For dense gradients the norm and the clipped gradients equal torch's."""
    grads = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad.values())  # a view: scaling it scales the gradient
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    total = _total_norm(grads)
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device_and_dtype: dict = {}
        for g in grads:
            by_device_and_dtype.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), same in by_device_and_dtype.items():
            torch._foreach_mul_(same, scale.to(device))
    return float(total)


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6: the norm clip_grad_norm_ uses, to the last bit
        return get_total_norm(tensors)
    first = tensors[0].device  # the same math; torch sums the per-tensor norms in its own group order
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).to(first) for t in tensors]))

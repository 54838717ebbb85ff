"""What the host state bank and parking tests share: the device, bank construction, sample data that exercises
every bit, and a bitwise comparison."""

import pytest
import torch

from lisa_kernels.host_state_bank import HostStateBank

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_bank(backend, **kwargs):
    kwargs.setdefault("chunk_bytes", 1 << 20)
    return HostStateBank(backend=backend, **kwargs)


def sample(shape, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.randint(0, 2, shape, generator=g).bool()
    elif dtype.is_floating_point:
        # Values spanning many binades, plus the specials, so "exact" means every bit.
        t = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 20, shape,
                                                                                              generator=g))
        t = t.to(dtype)
        if t.numel() >= 3:
            t.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), -0.0], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64)
        t = t.to(dtype)
    return t.to(device)


def assert_bitwise_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.device == expected.device
    if expected.dtype.is_floating_point:
        # Compare bit patterns: equal() would call -0.0 == 0.0 and nan != nan.
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
        actual, expected = actual.view(bits), expected.view(bits)
    mismatch = (actual != expected).sum().item()
    assert mismatch == 0, f"{mismatch} of {expected.numel()} elements differ"

"""How kernel results are judged: against the same-precision reference's own distance from fp64.

A kernel may differ from the fp64 result by at most twice what the plain PyTorch reference in the same precision
does, plus one unit in the last place of the largest value (a floor for the rare case where the reference is
exact). The single exception: Triton's interpreter truncates fp32 -> bf16 casts instead of rounding to nearest
even, so there bf16 results may sit one bf16 ulp from the same-precision reference, and no further.
"""

import torch


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(x.double().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.pow(2.0, exponent - 7)


def truncates_bf16(tensor: torch.Tensor, interpreted: bool) -> bool:
    return interpreted and tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16


def assert_matches_reference(out, ref, ref64, name="tensor", interpreted=False):
    """`out`: kernel result; `ref`: reference in the same precision; `ref64`: reference in fp64; `interpreted`:
    `out` comes from Triton's interpreter."""
    assert out.shape == ref.shape == ref64.shape, name
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if truncates_bf16(out, interpreted):
        distance = (out.double() - ref.double()).abs()
        allowed = bf16_ulp(ref)
        bad = distance > allowed
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {out.numel()} elements more than 1 bf16 ulp from the reference, "
            f"first at {int(bad.nonzero()[0])}: {out.flatten()[bad.flatten()][0]} vs {ref.flatten()[bad.flatten()][0]}"
        )
        return
    ref64 = ref64.double()
    kernel_error = (out.double() - ref64).abs().max().item()
    reference_error = (ref.double() - ref64).abs().max().item()
    floor = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert kernel_error <= 2 * reference_error + floor, (
        f"{name}: max error {kernel_error:.3e} vs fp64, reference in {out.dtype} has {reference_error:.3e} "
        f"(allowed {2 * reference_error + floor:.3e})"
    )


def devices():
    import pytest

    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, cuda])]

"""The Triton kernel and the foreach path against the plain reference, tensor by tensor; the functional entry
point on every path."""

import pytest
import torch
from reference_check import assert_matches_reference, devices, truncates_bf16

import lisa_kernels.adamw as adamw_module
from lisa_kernels import adamw_reference, fused_adamw_
from lisa_kernels.adamw import (
    TRITON_INTERPRETED,
    AdamWHyperparameters,
    _batches,
    _launch_kernel,
    _update_foreach,
    choose_path,
    kernel_scalars,
    round_to_bfloat16_stochastic,
    triton,
)

BLOCK = 1024  # small enough that the largest test tensor spans several chunks, big enough for the interpreter
SIZES = (0, 1, 7, 3 * BLOCK + 5)
# Gradients and moments of the size-7 tensor are tiny, so that eps matters in its denominator.
SCALES = (1.0, 1.0, 1e-5, 1.0)
HYPERS = [
    AdamWHyperparameters(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    AdamWHyperparameters(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, maximize=True),
    AdamWHyperparameters(lr=5e-2, beta1=0.95, beta2=0.9, eps=1e-6, weight_decay=0.2),
    AdamWHyperparameters(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.3),
]


def _check_steps(update, device, param_dtype, state_dtype, amsgrad, steps=3, seed=0, interpreted=False):
    """Runs `update` for `steps` steps on fresh random tensors; after each, compares every tensor with the
    reference applied to the same inputs, in the same precision and in fp64."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(device, param_dtype) for n in SIZES]
    states = [[torch.randn(n, generator=g).mul_(0.1 * c).to(device, state_dtype) for n, c in zip(SIZES, SCALES)]
              for _ in range(3)]
    states[1] = [s * c for s, c in zip(states[1], SCALES)]
    states[1] = [s.abs() for s in states[1]]
    states[2] = [torch.maximum(s, v) for s, v in zip(states[2], states[1])]
    tensors = [params, *states]
    names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 4 if amsgrad else 3]
    for step in range(1, steps + 1):
        grads = [torch.randn(n, generator=g).mul_(c).to(device, param_dtype) for n, c in zip(SIZES, SCALES)]
        ref = [[t.clone() for t in ts] for ts in tensors]
        ref64 = [[t.double() for t in ts] for ts in tensors]
        p, m, v, vmax = tensors
        update(p, grads, m, v, vmax if amsgrad else None,
               [kernel_scalars(HYPERS[i], step) for i in range(len(SIZES))])
        for ts, upcast in ((ref, False), (ref64, True)):
            for i, h in enumerate(HYPERS):
                adamw_reference(ts[0][i], grads[i], ts[1][i], ts[2][i], step, lr=h.lr, beta1=h.beta1,
                                beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay, maximize=h.maximize,
                                max_exp_avg_sq=ts[3][i] if amsgrad else None, upcast=upcast)
        for name, outs, refs, refs64 in zip(names, tensors, ref, ref64):
            for n, out, r, r64 in zip(SIZES, outs, refs, refs64):
                assert_matches_reference(out, r, r64, f"step {step} {name}[{n}]", interpreted)


DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("param_dtype,state_dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_kernel_matches_reference(device, param_dtype, state_dtype, amsgrad):
    if device == "cpu" and not TRITON_INTERPRETED:
        pytest.skip("the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1")

    def kernel(*args):
        _launch_kernel(*args, stochastic_rounding=False, block=BLOCK)

    _check_steps(kernel, device, param_dtype, state_dtype, amsgrad, interpreted=device == "cpu")


@pytest.mark.parametrize("param_dtype,state_dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_foreach_path_matches_reference(param_dtype, state_dtype, amsgrad):
    def foreach_path(*args):
        _update_foreach(*args, stochastic_rounding=False)

    _check_steps(foreach_path, "cpu", param_dtype, state_dtype, amsgrad)


PATHS = {"kernel": dict(triton_on_cpu=True), "default": {}, "foreach": dict(foreach=True)}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_functional_entry_point_matches_torch_adamw(device, path):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(n, generator=g).to(device) for n in (5, 1000, 3)]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    torch64 = [torch.nn.Parameter(p.double()) for p in params]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, amsgrad=True)
    reference = torch.optim.AdamW(torch_params, **kwargs)
    reference64 = torch.optim.AdamW(torch64, **kwargs)
    exp_avgs, exp_avg_sqs, maxes = ([torch.zeros_like(p) for p in params] for _ in range(3))
    steps = [torch.tensor(0.0) for _ in params]
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
        for tp, tp64, grad in zip(torch_params, torch64, grads):
            tp.grad, tp64.grad = grad.clone(), grad.double()
        reference.step()
        reference64.step()
        fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                     weight_decay=0.05, amsgrad=True, max_exp_avg_sqs=maxes, **path)
    assert [s.item() for s in steps] == [4.0] * 3
    for p, tp, tp64 in zip(params, torch_params, torch64):
        assert_matches_reference(p, tp.detach(), tp64.detach())


def test_functional_entry_point_skips_on_inf_and_unscales():
    params, grads = [torch.ones(8)], [torch.full((8,), 4.0)]
    exp_avgs, exp_avg_sqs, steps = [torch.zeros(8)], [torch.zeros(8)], [torch.tensor(0.0)]
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, found_inf=torch.tensor(1.0), **kwargs)
    assert steps[0].item() == 0 and torch.equal(params[0], torch.ones(8)) and not exp_avgs[0].any()
    fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale=torch.tensor(4.0),
                 found_inf=torch.tensor(0.0), **kwargs)
    assert steps[0].item() == 1
    torch.testing.assert_close(exp_avgs[0], torch.full((8,), 0.1))  # (1 - beta1) * grad / scale


def test_functional_entry_point_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="differ in length"):
        fused_adamw_([torch.ones(2)], [], [torch.zeros(2)], [torch.zeros(2)], [torch.tensor(0.0)], lr=0.1,
                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="max_exp_avg_sqs"):
        fused_adamw_([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.tensor(0.0)],
                     lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=True)


def test_functional_entry_point_refuses_mismatched_tensors_and_changes_nothing():
    params, grads = [torch.ones(8), torch.ones(300)], [torch.ones(8), torch.ones(300)]
    exp_avgs, exp_avg_sqs = [torch.zeros(8), torch.zeros(30)], [torch.zeros(8), torch.zeros(300)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    with pytest.raises(RuntimeError, match=r"params\[1\] \(shape \(300,\)\) has exp_avg of shape \(30,\)"):
        fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0)
    assert [s.item() for s in steps] == [0.0, 0.0] and torch.equal(params[0], torch.ones(8))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_stochastic_rounding_keeps_tiny_updates(device, path):
    # bf16 spacing at 1.0 is 2**-7; an update of 1e-3 is below half of it, so round-to-nearest never moves.
    n, steps = 1 << 16, 4
    results = {}
    for stochastic in (False, True):
        p = torch.ones(n, dtype=torch.bfloat16, device=device)
        grad, m, v = torch.ones_like(p), torch.zeros(n, device=device), torch.zeros(n, device=device)
        step = torch.tensor(0.0)
        for _ in range(steps):
            fused_adamw_([p], [grad], [m], [v], [step], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                         stochastic_rounding=stochastic, **path)
        results[stochastic] = p.float()
    if not truncates_bf16(results[True].bfloat16(), interpreted=bool(path.get("triton_on_cpu"))):
        assert torch.equal(results[False], torch.ones(n, device=device))
    # Adam's first steps move by lr each: the mean must land on 1 - steps * lr within a few standard errors.
    mean_move = 1 - results[True].mean().item()
    assert abs(mean_move - steps * 1e-3) < 5 * 2**-7 / n**0.5 * steps


def test_stochastic_rounding_is_unbiased_and_stays_on_neighbours():
    x = torch.full((1 << 16,), 1.0 + 2**-9)  # a quarter of the way from 1.0 to the next bf16 value
    rounded = round_to_bfloat16_stochastic(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs((rounded == 1.0 + 2**-7).float().mean().item() - 0.25) < 0.01


@pytest.mark.parametrize("device", devices())
def test_unaligned_tensors_match_reference(device):
    """Views that start 4 bytes into their storage take the kernel's narrow-access path."""
    if device == "cpu" and not TRITON_INTERPRETED:
        pytest.skip("the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(7)
    storage = [torch.randn(4 * BLOCK + 1, generator=g).to(device) for _ in range(4)]
    param, grad, exp_avg, exp_avg_sq = (t[1:] for t in storage)
    exp_avg_sq.abs_()
    assert param.data_ptr() % 16 != 0
    ref, ref64 = ([t.clone().to(dtype) for t in (param, exp_avg, exp_avg_sq)] for dtype in (None, torch.float64))
    h = HYPERS[0]
    _launch_kernel([param], [grad], [exp_avg], [exp_avg_sq], None, [kernel_scalars(h, 1)], False, BLOCK)
    for tensors, upcast in ((ref, False), (ref64, True)):
        adamw_reference(tensors[0], grad, tensors[1], tensors[2], 1, lr=h.lr, beta1=h.beta1, beta2=h.beta2,
                        eps=h.eps, weight_decay=h.weight_decay, upcast=upcast)
    for out, r, r64 in zip((param, exp_avg, exp_avg_sq), ref, ref64):
        assert_matches_reference(out, r, r64)


def test_batches_cut_big_tensors_and_pack_small_ones():
    assert _batches([3, 10, 0, 2], 4) == [[(0, 0, 3)], [(1, 0, 4)], [(1, 4, 8)], [(1, 8, 10), (3, 0, 2)]]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_working_copies_in_batches_match_reference(monkeypatch, amsgrad):
    """bf16 params with fp32 moments on CPU: torch's fused kernel on fp32 copies made batch by batch (here 1000
    elements a batch, so tensors are cut and packed)."""
    monkeypatch.setattr(adamw_module, "_WORKING_BATCH", 1000)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=g).bfloat16() for n in SIZES]
    exp_avgs, exp_avg_sqs, maxes = ([torch.zeros(n) for n in SIZES] for _ in range(3))
    steps = [torch.tensor(0.0) for _ in SIZES]
    ref, ref64 = ([[t.clone().to(dtype or t.dtype) for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, maxes)]
                  for dtype in (None, torch.float64))
    h = HYPERS[0]
    for step in range(1, 4):
        grads = [torch.randn(n, generator=g).bfloat16() for n in SIZES]
        fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
                     weight_decay=h.weight_decay, amsgrad=amsgrad, max_exp_avg_sqs=maxes)
        for ts, upcast in ((ref, False), (ref64, True)):
            for i, grad in enumerate(grads):
                adamw_reference(ts[0][i], grad, ts[1][i], ts[2][i], step, lr=h.lr, beta1=h.beta1, beta2=h.beta2,
                                eps=h.eps, weight_decay=h.weight_decay, max_exp_avg_sq=ts[3][i] if amsgrad else None,
                                upcast=upcast)
    for outs, refs, refs64 in zip((params, exp_avgs, exp_avg_sqs), ref, ref64):
        for out, r, r64 in zip(outs, refs, refs64):
            assert_matches_reference(out, r, r64, f"size {out.numel()}")


def test_paths_are_chosen_by_arguments(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # choosing touches no GPU
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    kernel = "triton" if triton is not None else "foreach"
    assert choose_path(cpu, f32, f32, f32) == choose_path(cpu, bf16, bf16, f32, fused=True) == "torch_fused"
    assert choose_path(cpu, f64, f64, f64) == "torch_fused"
    assert choose_path(cuda, bf16, bf16, f32) == choose_path(cuda, f32, f32, f32, triton_on_cpu=True) == kernel
    assert choose_path(cuda, f64, f64, f64) == "foreach"  # fp64 is never computed in the fp32 kernel
    assert choose_path(cpu, f32, f32, f32, foreach=True) == choose_path(cuda, f32, f32, f32, fused=False) == "foreach"
    if triton is not None:
        monkeypatch.setattr(adamw_module, "TRITON_INTERPRETED", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            choose_path(cpu, f32, f32, f32, triton_on_cpu=True)

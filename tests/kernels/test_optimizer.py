"""FusedAdamW as a drop-in torch.optim.AdamW on each of its paths: same results (bit for bit where torch's fused
kernel does the work, to 1e-12 in fp64), state_dict both ways, frozen params, GradScaler, bad hyperparameters
(inputs it must not trust and torch.compile: test_optimizer_inputs.py)."""

import pytest
import torch
from adamw_inputs import PATHS, SIZES, make_params, set_grads
from reference_check import assert_matches_reference, devices

import lisa_kernels.adamw as adamw_module
from lisa_kernels import FusedAdamW

def _clone(params, dtype=None):
    return [torch.nn.Parameter(p.detach().to(dtype or p.dtype).clone()) for p in params]


def _groups(params, configs):
    if configs is None:
        return params
    return [dict(params=params[i::len(configs)], **c) for i, c in enumerate(configs)]


CONFIGS = {
    "default": ({}, None),
    "lr": ({"lr": 3e-2}, None),
    "no weight decay": ({"weight_decay": 0.0}, None),
    "weight decay": ({"weight_decay": 0.3, "lr": 1e-2}, None),
    "amsgrad": ({"amsgrad": True, "lr": 1e-2}, None),
    "maximize": ({"maximize": True, "lr": 1e-2}, None),
    "betas and eps": ({"betas": (0.8, 0.99), "eps": 1e-6}, None),
    "tensor lr": ({"lr": torch.tensor(2e-2)}, None),
    "groups": ({}, [{"lr": 1e-2, "weight_decay": 0.0}, {"lr": 2e-3, "betas": (0.85, 0.95), "amsgrad": True},
                    {"maximize": True, "eps": 1e-5}]),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_adamw(device, path, config):
    kwargs, groups = config
    ours = make_params(device)
    if path.get("foreach") and isinstance(kwargs.get("lr"), torch.Tensor):
        for cls in (FusedAdamW, torch.optim.AdamW):  # torch's foreach path refuses a tensor lr; so do we
            with pytest.raises(ValueError, match="lr as a Tensor"):
                cls(ours, foreach=True, **kwargs)
        return
    theirs, theirs64 = _clone(ours), _clone(ours, torch.float64)
    optimizers = [FusedAdamW(_groups(ours, groups), **kwargs, **path)] + [
        torch.optim.AdamW(_groups(ps, groups), **kwargs) for ps in (theirs, theirs64)
    ]
    for step in range(5):
        set_grads([ours, theirs, theirs64], seed=step)
        for opt in optimizers:
            opt.step()
    for i, (p, q, q64) in enumerate(zip(ours, theirs, theirs64)):
        assert_matches_reference(p.detach(), q.detach(), q64.detach(), f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            s, t, t64 = (opt.state[x][key] for opt, x in zip(optimizers, (p, q, q64)))
            assert_matches_reference(s, t, t64, f"param {i} {key}")
        assert optimizers[0].state[p]["step"].item() == 5


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_float64_matches_torch_adamw_to_1e_12(path, config):
    """fp64 params are computed in fp64 on every path (the kernel is fp32-only, so they never reach it). A tensor lr
    is fp64 here: torch computes with a float32 one in float32 (1e-7 apart from fp64 math)."""
    kwargs, groups = config
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if path.get("foreach") and "lr" in kwargs and isinstance(kwargs["lr"], torch.Tensor):
        return  # refused by torch and by us: test_matches_torch_adamw
    ours = make_params("cpu", torch.float64, sizes=SIZES[:4])
    theirs = _clone(ours)
    optimizers = [FusedAdamW(_groups(ours, groups), **kwargs, **path),
                  torch.optim.AdamW(_groups(theirs, groups), **kwargs)]
    for step in range(5):
        set_grads([ours, theirs], seed=step)
        for opt in optimizers:
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizers[0].state[p][key], optimizers[1].state[q][key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, None), (torch.float64, None),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cpu_default_equals_torch_fused_bit_for_bit(dtype, state_dtype, config):
    """Where param, grad and moments share a dtype, the CPU default is torch's own fused kernel, called alike."""
    kwargs, groups = config
    ours = make_params("cpu", dtype, sizes=SIZES[:4])
    theirs = _clone(ours)
    optimizers = [FusedAdamW(_groups(ours, groups), state_dtype=state_dtype, **kwargs),
                  torch.optim.AdamW(_groups(theirs, groups), fused=True, **kwargs)]
    for step in range(4):
        set_grads([ours, theirs], seed=step)
        for opt in optimizers:
            opt.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizers[0].state[p][key], optimizers[1].state[q][key])


@pytest.mark.parametrize("device", devices())
def test_frozen_params_are_untouched_and_get_no_state(device):
    params = make_params(device)
    before = [p.detach().clone() for p in params]
    opt = FusedAdamW(params, lr=1e-2)
    frozen = {1, 3}
    for step in range(3):
        set_grads([params], seed=step, frozen=frozen)
        opt.step()
    for i, (p, b) in enumerate(zip(params, before)):
        if i in frozen:
            assert torch.equal(p, b) and p not in opt.state
        else:
            assert p in opt.state and (p.numel() == 0 or not torch.equal(p, b))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_mixed_dtypes_in_one_optimizer(device, path, monkeypatch):
    """fp32, bf16 and fp16 params (fp32 moments) in one optimizer: each matches the per-tensor reference, and on
    the kernel's path each dtype group is one launch however many tensors it holds."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 20
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(11 + i, generator=g).to(device, dt)) for i, dt in enumerate(dtypes)]
    opt = FusedAdamW(params, lr=1e-2, weight_decay=0.1, **path)
    kernel = device == "cuda" and not path.get("foreach") or path.get("triton_on_cpu")
    launches = []
    real_launch = adamw_module._launch_kernel
    monkeypatch.setattr(adamw_module, "_launch_kernel", lambda *a: launches.append(a[0][0].dtype) or real_launch(*a))
    for step in range(1, 4):
        set_grads([params], seed=step)
        inputs = {p: (p.detach().clone(), *(opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")))
                  if p in opt.state else (p.detach().clone(), torch.zeros_like(p, dtype=torch.float32),
                                          torch.zeros_like(p, dtype=torch.float32)) for p in params}
        launches.clear()
        opt.step()
        if kernel:
            assert sorted(launches, key=str) == sorted(set(dtypes), key=str)
        for p in params:
            ref, ref64 = ([t.double() if upcast else t.clone() for t in inputs[p]] for upcast in (False, True))
            for tensors, upcast in ((ref, False), (ref64, True)):
                adamw_module.adamw_reference(tensors[0], p.grad, tensors[1], tensors[2], step, lr=1e-2, beta1=0.9,
                                             beta2=0.999, eps=1e-8, weight_decay=0.1, upcast=upcast)
            assert opt.state[p]["exp_avg"].dtype == torch.float32
            interpreted = kernel and device == "cpu"
            assert_matches_reference(p.detach(), ref[0], ref64[0], f"{p.dtype} param", interpreted)
            assert_matches_reference(opt.state[p]["exp_avg_sq"], ref[2], ref64[2], f"{p.dtype} exp_avg_sq",
                                     interpreted)


def test_state_dtype_bfloat16_moments():
    params = make_params("cpu", sizes=(5, 300))
    opt = FusedAdamW(params, state_dtype=torch.bfloat16)
    set_grads([params], seed=0)
    opt.step()
    assert all(opt.state[p][k].dtype == torch.bfloat16 for p in params for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("device", devices())
def test_state_dict_round_trips_with_torch_adamw(device):
    """Train a while, hand the state to the other optimizer, train on: both ways, the same as staying."""
    for source_cls, target_cls in ((FusedAdamW, torch.optim.AdamW), (torch.optim.AdamW, FusedAdamW)):
        a, b = make_params(device, seed=1), make_params(device, seed=1)
        kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
        staying, source = source_cls(a, **kwargs), source_cls(b, **kwargs)
        for step in range(3):
            set_grads([a, b], seed=step)
            staying.step()
            source.step()
        target = target_cls(b, **kwargs)
        target.load_state_dict(source.state_dict())
        for step in range(3, 6):
            set_grads([a, b], seed=step)
            staying.step()
            target.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert target.state[q]["step"].item() == 6


def test_state_dict_resume_is_bit_identical():
    a, b = make_params("cpu", seed=2), make_params("cpu", seed=2)
    uninterrupted, first = FusedAdamW(a, lr=1e-2), FusedAdamW(b, lr=1e-2)
    for step in range(3):
        set_grads([a, b], seed=step)
        uninterrupted.step()
        first.step()
    resumed = FusedAdamW(b, lr=1e-2)
    resumed.load_state_dict(first.state_dict())
    for step in range(3, 5):
        set_grads([a, b], seed=step)
        uninterrupted.step()
        resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_loading_torch_state_for_bf16_params_keeps_fp32_moments():
    params = make_params("cpu", torch.bfloat16, sizes=(9,))
    torch_opt = torch.optim.AdamW(_clone(params, torch.float32))
    set_grads([torch_opt.param_groups[0]["params"]], seed=0)
    torch_opt.step()
    saved = torch_opt.state_dict()
    opt = FusedAdamW(params)
    opt.load_state_dict(saved)
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["step"].device.type == "cpu"
    assert torch.equal(state["exp_avg"], saved["state"][0]["exp_avg"])


def test_lr_scheduler_and_add_param_group_match_torch():
    ours, theirs = make_params("cpu", seed=4), make_params("cpu", seed=4)
    opts = [FusedAdamW(ours[:3], lr=1e-2), torch.optim.AdamW(theirs[:3], lr=1e-2)]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    for step in range(6):
        if step == 2:
            for o, ps in zip(opts, (ours, theirs)):
                o.add_param_group({"params": ps[3:], "lr": 5e-3, "weight_decay": 0.0})
        set_grads([ours, theirs], seed=step)
        for o, s in zip(opts, schedulers):
            o.step()
            s.step()
            o.zero_grad()
    assert all(p.grad is None for p in ours)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_inf_steps_and_unscales():
    """fp16 training under torch.amp.GradScaler: an inf step changes nothing; finite steps equal unscaled AdamW."""
    torch.manual_seed(0)
    ours, plain = make_params("cpu", sizes=(7, 300), seed=5), make_params("cpu", sizes=(7, 300), seed=5)
    # A large eps makes the update depend on the gradient's scale, so a missed unscale would show.
    opt, reference = FusedAdamW(ours, lr=1e-2, eps=0.1), torch.optim.AdamW(plain, lr=1e-2, eps=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        loss = sum((p * torch.linspace(-1, 1, p.numel())).sum() * (step + 1) for p in ours)
        if step == 2:
            loss = loss + ours[0][0] * float("inf")
        before = [p.detach().clone() for p in ours]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if step == 2:
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            assert opt.state[ours[0]]["step"].item() == 2
            continue
        plain_loss = sum((p * torch.linspace(-1, 1, p.numel())).sum() * (step + 1) for p in plain)
        plain_loss.backward()
        reference.step()
        reference.zero_grad()
    assert scaler.get_scale() < 2.0**10
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


INVALID = [
    dict(lr=-1e-3),
    dict(eps=-1e-8),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, -0.1)),
    dict(weight_decay=-0.1),
    dict(lr=torch.tensor([1e-3, 1e-3])),
]


@pytest.mark.parametrize("kwargs", INVALID, ids=[str(k) for k in INVALID])
def test_invalid_hyperparameters_raise_like_torch(kwargs):
    params = make_params("cpu", sizes=(3,))
    with pytest.raises(ValueError) as torch_error:
        torch.optim.AdamW(params, **kwargs)
    with pytest.raises(ValueError) as our_error:
        FusedAdamW(params, **kwargs)
    assert str(our_error.value) == str(torch_error.value)


def test_unsupported_options_are_named():
    params = make_params("cpu", sizes=(3,))
    for kwargs, name in ((dict(capturable=True), "capturable"), (dict(differentiable=True), "differentiable"),
                         (dict(state_dtype=torch.float16), "state_dtype")):
        with pytest.raises(ValueError, match=name):
            FusedAdamW(params, **kwargs)


def test_defaults_and_signature_match_torch():
    import inspect

    ours = inspect.signature(FusedAdamW).parameters
    theirs = inspect.signature(torch.optim.AdamW).parameters
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default and ours[name].kind == parameter.kind, name


# ---------------------------------------------------------------- inputs the kernel must never trust

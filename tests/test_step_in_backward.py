"""The optimizer step fused into backward: `FusedAdamW.step_param` equals `step()` bit for bit on every path,
`StepInBackward` equals a plain backward + step while holding one gradient at a time, and LisaTrainer's
`optimizer_in_backward` trains exactly as the plain step does."""

import math

import pytest
import torch

from lisa_kernels import FusedAdamW, HostStateBank, StepInBackward

PATHS = {"kernel": dict(triton_on_cpu=True), "default": {}, "foreach": dict(foreach=True)}
SHAPES = ((1,), (3,), (257,), (5, 7))


def _model_params(dtype, seed=0):
    """Params of odd sizes, and a 'vocabulary' of 11 rows x 6 for the sparse_rows group."""
    g = torch.Generator().manual_seed(seed)
    dense = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    table = torch.nn.Parameter(torch.randn(11, 6, generator=g).to(dtype))
    return dense, table


def _groups(dense, table):
    return [{"params": dense[:2], "weight_decay": 0.1},
            {"params": dense[2:], "amsgrad": True, "lr": 1e-2, "betas": (0.8, 0.95)},
            {"params": [table], "sparse_rows": True, "weight_decay": 0.05}]


def _set_grads(params, step):
    """Fresh gradients; the table's has zero rows, and the rows used change from step to step."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    table = params[-1]
    table.grad[torch.arange(table.shape[0]) % 3 != step % 3] = 0


def _assert_same_state(a: FusedAdamW, b: FusedAdamW, params_a, params_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_step_param_over_every_param_equals_step(path, dtype):
    dense_a, table_a = _model_params(dtype)
    dense_b, table_b = _model_params(dtype)
    opt_a = FusedAdamW(_groups(dense_a, table_a), lr=3e-2, **path)
    opt_b = FusedAdamW(_groups(dense_b, table_b), lr=3e-2, **path)
    params_a, params_b = dense_a + [table_a], dense_b + [table_b]
    for step in range(3):
        _set_grads(params_a, step)
        _set_grads(params_b, step)
        if step == 1:  # a param without a gradient is skipped by both
            params_a[0].grad = params_b[0].grad = None
        opt_a.step()
        for p in reversed(params_b):  # backward's order, not the groups'
            opt_b.step_param(p)
        _assert_same_state(opt_a, opt_b, params_a, params_b)
    assert not torch.equal(table_a, _model_params(dtype)[1])  # the test moved the weights


def test_step_param_brings_parked_state_back_first():
    dense_a, table_a = _model_params(torch.bfloat16)
    dense_b, table_b = _model_params(torch.bfloat16)
    opt_a = FusedAdamW(_groups(dense_a, table_a), lr=3e-2)
    opt_b = FusedAdamW(_groups(dense_b, table_b), lr=3e-2, state_bank=HostStateBank(backend="fallback"))
    params_a, params_b = dense_a + [table_a], dense_b + [table_b]
    for step in range(2):
        _set_grads(params_a, step)
        _set_grads(params_b, step)
        opt_a.step()
        for p in params_b:
            opt_b.step_param(p)
        opt_b.state_parker.park(params_b)
    assert opt_b.state_parker.parked_params == params_b
    opt_b.state_parker.unpark(params_b)
    _assert_same_state(opt_a, opt_b, params_a, params_b)


def test_step_param_refuses_a_param_it_does_not_hold():
    opt = FusedAdamW([torch.nn.Parameter(torch.ones(3))])
    stranger = torch.nn.Parameter(torch.ones(3))
    stranger.grad = torch.ones(3)
    with pytest.raises(ValueError, match="none of the optimizer's param groups"):
        opt.step_param(stranger)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(13, 8), torch.nn.Linear(8, 16), torch.nn.GELU(),
                               torch.nn.LayerNorm(16), torch.nn.Linear(16, 13))


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 13, (4, 5), generator=g)
    return torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, 1).flatten())


def test_hooks_equal_backward_then_step_and_hold_one_gradient_at_a_time():
    plain, hooked = _tiny_model(), _tiny_model()
    hooked[3].requires_grad_(False)  # a frozen module: no gradient, no update, no state
    plain[3].requires_grad_(False)
    opt_plain = FusedAdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_hooked = FusedAdamW(hooked.parameters(), lr=1e-2, weight_decay=0.1)
    stepping = StepInBackward(opt_hooked)
    alive_at_hook = []
    for p in (p for p in hooked.parameters() if p.requires_grad):  # after StepInBackward's hook, so after its update
        p.register_post_accumulate_grad_hook(
            lambda _: alive_at_hook.append(sum(q.grad is not None for q in hooked.parameters())))
    for step in range(4):
        loss = _loss(plain, step)
        loss.backward()
        expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()
                                                              if p.grad is not None]))
        opt_plain.step()
        opt_plain.zero_grad()
        stepping.reset()
        _loss(hooked, step).backward()
        assert all(p.grad is None for p in hooked.parameters())
        assert stepping.finite and torch.allclose(stepping.grad_norm(), expected_norm, rtol=1e-6)
        for a, b in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(a, b)
    assert max(alive_at_hook) == 0 and len(alive_at_hook) == 4 * 5  # 5 trainable tensors, each freed at once
    assert not opt_hooked.state[hooked[3].weight]


def test_a_nonfinite_gradient_leaves_its_tensor_untouched_and_flags_the_step():
    model = _tiny_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    stepping = StepInBackward(opt)
    head_before = model[4].weight.detach().clone()
    first_before = model[1].weight.detach().clone()
    model[4].weight.register_hook(lambda g: torch.cat([torch.full_like(g[:1], torch.nan), g[1:]]))  # a NaN row
    _loss(model, 0).backward()
    assert not stepping.finite and stepping.skipped == [model[4].weight]
    assert math.isnan(stepping.grad_norm())
    assert torch.equal(model[4].weight, head_before) and not opt.state[model[4].weight]
    assert not torch.equal(model[1].weight, first_before)  # the finite ones were updated
    assert model[4].weight.grad is None
    stepping.reset()
    assert stepping.finite and float(stepping.grad_norm()) == 0.0


def test_detach_removes_the_hooks():
    model = _tiny_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    with StepInBackward(opt) as stepping:
        assert stepping.attached
    assert not stepping.attached
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing stepped, nothing freed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_needs_an_optimizer_with_step_param():
    model = _tiny_model()
    with pytest.raises(TypeError, match="step_param"):
        StepInBackward(torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_step_param_rounds_stochastically_when_asked(path):
    """An update of +1e-4 on bf16 ones is below half an ulp (2**-8): lost by nearest rounding (and by the
    interpreter's truncating cast), kept on average by stochastic rounding (its noise differs from step()'s launch,
    so only the distribution is the same)."""
    moved = {}
    for stochastic in (False, True):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = FusedAdamW([p], lr=1e-4, weight_decay=0.0, stochastic_rounding=stochastic, **path)
        p.grad = -torch.ones_like(p)
        opt.step_param(p)
        moved[stochastic] = int((p != 1).sum())
    assert moved[False] == 0 and 0 < moved[True] < 4096 // 10  # ~1e-4 / 2**-7 of them: 1.3%

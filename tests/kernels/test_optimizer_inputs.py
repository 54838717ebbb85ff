"""FusedAdamW on inputs it must never trust (moments of the wrong size or device, wrong gradient shapes,
channels-last and non-contiguous tensors, a parameter given twice), as torch.optim.AdamW treats them; and under
torch.compile."""

import copy

import pytest
import torch
from adamw_inputs import PATHS, make_params, set_grads

from lisa_kernels import FusedAdamW


@pytest.fixture(params=PATHS.values(), ids=PATHS.keys())
def path(request):
    """FusedAdamW's keyword arguments for each path."""
    return request.param


def _trained_torch_state(shape, steps=2, memory_format=torch.contiguous_format):
    param = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
    opt = torch.optim.AdamW([param], lr=1e-2)
    for step in range(steps):
        set_grads([[param]], seed=step)
        opt.step()
    saved = opt.state_dict()
    for key in ("exp_avg", "exp_avg_sq"):
        saved["state"][0][key] = saved["state"][0][key].contiguous(memory_format=memory_format)
    return param, opt, saved


def test_moments_of_the_wrong_size_raise_like_torch(path):
    params = make_params("cpu", sizes=(300,))
    opt = FusedAdamW(params, **path)
    _, _, saved = _trained_torch_state((300,))
    saved["state"][0]["exp_avg"] = torch.zeros(10)
    opt.load_state_dict(saved)
    set_grads([params], seed=0)
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 .*exp_avg of shape \(10,\)"):
        opt.step()
    assert torch.equal(params[0], before)


def test_grad_of_the_wrong_shape_raises_like_torch(path):
    params = make_params("cpu", sizes=(5, 300))
    opt = FusedAdamW(params, **path)
    set_grads([params], seed=0)
    params[1].grad.data = torch.randn(7)
    with pytest.raises(RuntimeError, match=r"parameter 1 of param group 0 .*grad of shape \(7,\)"):
        opt.step()


def test_integer_param_or_moments_on_another_device_raise_like_torch(path):
    p = torch.nn.Parameter(torch.arange(6), requires_grad=False)
    p.grad = torch.ones(6, dtype=torch.int64)
    with pytest.raises(RuntimeError):
        torch.optim.AdamW([p]).step()
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 .*torch.int64"):
        FusedAdamW([p], **path).step()
    assert torch.equal(p, torch.arange(6))
    q = torch.nn.Parameter(torch.ones(4))
    q.grad = torch.ones(4)
    opt = FusedAdamW([q], **path)
    opt.step()
    opt.state[q]["exp_avg_sq"] = opt.state[q]["exp_avg_sq"].to("meta")
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 .*exp_avg_sq is on meta"):
        opt.step()


def test_channels_last_moments_from_torch_state_match_torch(path):
    torch_param, torch_opt, saved = _trained_torch_state((2, 6, 5, 7), memory_format=torch.channels_last)
    ours = torch.nn.Parameter(torch_param.detach().clone())
    opt = FusedAdamW([ours], lr=1e-2, **path)
    opt.load_state_dict(saved)
    torch_opt.load_state_dict(saved)
    for step in range(2, 4):
        set_grads([[ours], [torch_param]], seed=step)
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(ours, torch_param, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[ours]["exp_avg"], torch_opt.state[torch_param]["exp_avg"])


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided view"])
def test_non_contiguous_params_match_torch(path, layout):
    g = torch.Generator().manual_seed(11)
    make = {"transposed": lambda: torch.randn(9, 13, generator=g).t(),
            "channels_last": lambda: torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
            "strided view": lambda: torch.randn(10, 8, generator=g)[::2, 1:]}[layout]
    ours, theirs = (torch.nn.Parameter(make()) for _ in range(2))
    theirs.data.copy_(ours)
    assert not ours.is_contiguous() and ours.stride() == theirs.stride()
    opts = [FusedAdamW([ours], lr=1e-2, weight_decay=0.1, **path),
            torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)]
    for step in range(3):
        ours.grad, theirs.grad = make(), make()
        theirs.grad.copy_(ours.grad)
        for opt in opts:
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.stride() == theirs.stride()


def test_same_param_twice_in_a_group_matches_torch(path):
    ours, theirs = make_params("cpu", sizes=(5, 300), seed=6), make_params("cpu", sizes=(5, 300), seed=6)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opts = [FusedAdamW([ours[0], ours[1], ours[0]], lr=1e-2, **path),
                torch.optim.AdamW([theirs[0], theirs[1], theirs[0]], lr=1e-2)]
    for step in range(3):
        set_grads([ours, theirs], seed=step)
        for opt in opts:
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opts[0].state[ours[0]]["step"].item() == opts[1].state[theirs[0]]["step"].item() == 6


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_compiled_step_has_no_graph_breaks_or_recompiles_and_equals_eager(path):
    """torch.compile(step, fullgraph=True): one graph around the custom op lisa_kernels::adamw_ (every path runs
    inside it), retraced once after the first step creates state, then reused. aot_eager functionalizes the op's
    in-place updates as inductor would, without a C++ compiler."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    compiled, eager = (make_params("cpu", sizes=(3, 257), seed=8) + make_params("cpu", torch.bfloat16, sizes=(5,), seed=8)
                       for _ in range(2))
    optimizers = [FusedAdamW(ps, lr=1e-2, amsgrad=True, **path) for ps in (compiled, eager)]
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(optimizers[0].step, backend=counter, fullgraph=True)
    for step in range(4):
        set_grads([compiled, eager], seed=step)
        compiled_step()
        optimizers[1].step()
        if step == 1:
            graphs_after_warm_up = counter.frame_count
    assert counter.frame_count == graphs_after_warm_up <= 2
    assert all(torch.equal(p, q) for p, q in zip(compiled, eager))


def test_compiled_training_step_equals_eager():
    """Forward, backward and step in one compiled function (aot_eager, as in the test above)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))]
    models.append(copy.deepcopy(models[0]))
    optimizers = [FusedAdamW(m.parameters(), lr=1e-2) for m in models]
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def train_step(model, optimizer):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(train_step, backend=counter)
    for step in range(4):
        assert torch.equal(compiled_step(models[0], optimizers[0]), train_step(models[1], optimizers[1]))
        if step == 1:
            graphs_after_warm_up = counter.frame_count
    assert counter.frame_count == graphs_after_warm_up
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))

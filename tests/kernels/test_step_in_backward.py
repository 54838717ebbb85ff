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
    alive = {"before": [], "after": []}  # gradients alive when each tensor's is complete, and after its update

    def count_alive(when):
        trainable = [p for p in hooked.parameters() if p.requires_grad]
        for p in trainable:  # hooks run in the order they were registered
            p.register_post_accumulate_grad_hook(
                lambda _: alive[when].append(sum(q.grad is not None for q in hooked.parameters())))

    count_alive("before")
    stepping = StepInBackward(opt_hooked)
    count_alive("after")
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
    # 5 trainable tensors, each one's gradient the only one alive, and freed once it is used
    assert alive == {"before": [1] * 4 * 5, "after": [0] * 4 * 5}
    assert not opt_hooked.state[hooked[3].weight]


def test_hooks_take_a_sparse_embedding_gradient_in_its_row_sparse_group():
    """nn.Embedding(sparse=True) in a sparse_rows group: coalesced in the hook, stepped as a plain step steps it."""
    plain, hooked = _tiny_model(), _tiny_model()
    optimizers = []
    for model in (plain, hooked):
        model[0].sparse = True
        optimizers.append(FusedAdamW([{"params": [model[0].weight], "sparse_rows": True},
                                      {"params": list(model[1:].parameters())}], lr=1e-2, weight_decay=0.1))
    stepping = StepInBackward(optimizers[1])
    for step in range(3):
        _loss(plain, step).backward()
        assert plain[0].weight.grad.is_sparse
        sparse = plain[0].weight.grad = plain[0].weight.grad.coalesce()
        expected_norm = torch.linalg.vector_norm(torch.stack(
            [sparse.values().norm()] + [p.grad.norm() for p in plain[1:].parameters()]))
        optimizers[0].step()
        optimizers[0].zero_grad()
        stepping.reset()
        _loss(hooked, step).backward()
        assert torch.allclose(stepping.grad_norm(), expected_norm, rtol=1e-6)
        for a, b in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(a, b) and b.grad is None
    _assert_same_state(optimizers[0], optimizers[1], list(plain.parameters()), list(hooked.parameters()))


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


# ------------------------------------------------------------------------------------------ LisaTrainer's option

@pytest.fixture(scope="module")
def data(tok):
    from lisa_trainer.data import load_and_tokenize
    from lisa_trainer.demo import demo_dataset_path

    return load_and_tokenize(demo_dataset_path(), tok, block_size=32)


def _trainer(tmp_path, tok, data, **kw):
    from lisa_trainer import LisaConfig
    from lisa_trainer.demo import build_demo_model
    from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

    args = dict(output_dir=str(tmp_path), learning_rate=3e-3, max_steps=8, per_device_train_batch_size=4,
                max_grad_norm=0.0, weight_decay=0.01, progress=False, save_model=False)
    model = build_demo_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
    lisa = LisaConfig(n_active_layers=2, interval_steps=2, state_policy="park")
    return LisaTrainer(model, tok, data, LisaTrainingArguments(**args, **kw), lisa)


@pytest.mark.usefixtures("pytorch_optimizer_path")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_trainer_in_backward_trains_exactly_as_the_plain_step(tmp_path, tok, data, checkpointing):
    """Four LISA periods with parked state: a layer that leaves and comes back resumes its moments from the bank
    before its first update in backward; the chunked loss is on."""
    plain = _trainer(tmp_path / "plain", tok, data, gradient_checkpointing=checkpointing)
    fused = _trainer(tmp_path / "fused", tok, data, gradient_checkpointing=checkpointing, optimizer_in_backward=True)
    assert fused.memory.chunked_loss is not None
    periods = []
    for _ in range(8):
        a, b = plain.train_step(), fused.train_step()
        assert a["loss"] == b["loss"] and not b.get("skipped")
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters()):
            assert torch.equal(p, q), name
            assert q.grad is None, name
        periods.append(set(fused.controller.active_layers))
    assert any(layer in periods[j]  # a layer parked at a switch, brought back later
               for i in range(0, 4, 2) for layer in periods[i] - periods[i + 2] for j in range(i + 4, 8, 2))
    assert any(getattr(m, "gradient_checkpointing", False) for m in fused.model.modules()) == checkpointing
    assert plain.controller.period_log == fused.controller.period_log  # update norms see the same weights


@pytest.mark.usefixtures("pytorch_optimizer_path")
def test_trainer_in_backward_skips_a_nonfinite_gradient_and_logs_the_step_skipped(tmp_path, tok, data):
    t = _trainer(tmp_path, tok, data, optimizer_in_backward=True)
    head = t.model.get_output_embeddings().weight
    before = head.detach().clone()
    hook = head.register_hook(lambda g: torch.full_like(g, torch.inf))
    record = t.train_step()
    hook.remove()
    assert record["skipped"] and not math.isfinite(record["grad_norm"])
    assert torch.equal(head, before) and head.grad is None
    assert not t.train_step().get("skipped")
    assert not torch.equal(head, before)


@pytest.mark.parametrize("flags, named", [
    (dict(max_grad_norm=1.0), "max_grad_norm"),
    (dict(max_grad_norm=0.0, gradient_accumulation_steps=2), "gradient_accumulation_steps"),
    (dict(max_grad_norm=0.0, optim="adamw_torch"), "optim"),
])
def test_trainer_option_refuses_what_needs_all_gradients_first(flags, named):
    from lisa_trainer.options import OptionError, command_line_message
    from lisa_trainer.trainer import LisaTrainingArguments

    with pytest.raises(OptionError) as error:
        LisaTrainingArguments(output_dir="x", optimizer_in_backward=True, **flags)
    message = command_line_message(error.value, [LisaTrainingArguments])
    assert message.startswith("--optimizer_in_backward needs ") and f"--{named} " in message
    LisaTrainingArguments(output_dir="x", **flags)  # each is fine without the option


def test_trainer_option_refuses_several_processes(tmp_path, tok, data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="optimizer_in_backward runs in one process.*WORLD_SIZE=2"):
        _trainer(tmp_path, tok, data, optimizer_in_backward=True)

"""LisaController and LisaConfig: the switch, the state policies, prefetching, update norms, ranks and resume.

A tiny random-weight Llama (4 layers) trains on fixed random token batches with the real FusedAdamW (its PyTorch
CPU path) and its real state-bank hooks.
"""

import copy
import json
import math

import pytest
import torch
import transformers

from lisa_kernels import FusedAdamW, StateParker
from lisa_trainer import LisaConfig, LisaController, build_optimizer
from controller_run import (
    N_LAYERS,
    batch,
    layer_of,
    make_optimizer,
    on_device,
    record_parker_calls,
    snapshot,
    state_layers,
    tiny_llama,
    train_step,
)

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


# ------------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("field, value", [
    ("n_active_layers", 0), ("n_active_layers", 1.5), ("interval_steps", 0), ("interval_steps", True),
    ("layers_attribute", ""), ("seed", "0"), ("layer_weights", [1, -1, 1]), ("layer_weights", [1, 0, 0]),
    ("layer_weights", "1,1"), ("layer_weights", [1, float("nan"), 1]), ("state_policy", "offload"),
    ("prefetch_steps", -1), ("always_trainable", "lm_head"), ("track_update_norms", 1),
])
def test_config_errors_name_the_field(field, value):
    kwargs = {"n_active_layers": 2, field: value}
    with pytest.raises(ValueError, match=f"LisaConfig.{field}"):
        LisaConfig(**kwargs)


def test_controller_errors_name_the_problem():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"n_active_layers \(5\) exceeds the model's 4 decoder layers \(at 'model.layers'\)"):
        LisaController(model, make_optimizer(model), LisaConfig(n_active_layers=5))
    with pytest.raises(ValueError, match="layer_weights has 3 entries but the model has 4 decoder layers"):
        LisaController(model, make_optimizer(model), LisaConfig(n_active_layers=1, layer_weights=[1, 1, 1]))
    # Any torch optimizer works with every policy: "park" attaches a StateParker to it.
    plain = torch.optim.AdamW(model.parameters())
    ctrl = LisaController(model, plain, LisaConfig(n_active_layers=1))
    assert ctrl.parker is StateParker.of(plain) and plain.state_parker is ctrl.parker


def test_optimizer_missing_frozen_layers_is_refused():
    # The ms-swift bug: freeze first, then build the optimizer over requires_grad params only. Later-sampled
    # layers would never train, so the controller refuses such an optimizer.
    model = tiny_llama()
    for p in model.model.layers[1:].parameters():
        p.requires_grad_(False)
    trainable_only = FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match=r"does not hold \d+ parameters that LISA trains .*model\.layers\.1\."):
        LisaController(model, trainable_only, LisaConfig(n_active_layers=1, state_policy="keep"))


def test_build_optimizer_holds_every_parameter_with_no_decay_group():
    model = tiny_llama()
    model.model.layers[2].requires_grad_(False)  # frozen now, still in the optimizer
    opt = build_optimizer(model, LisaConfig(), lr=3e-4, weight_decay=0.05, betas=(0.9, 0.95))
    assert isinstance(opt, FusedAdamW)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(set(map(id, held)))
    decay, no_decay, embedding, head = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["lr"] == 3e-4 and decay["betas"] == (0.9, 0.95)
    assert embedding["params"][0] is model.get_input_embeddings().weight and embedding["weight_decay"] == 0.05
    assert head["params"][0] is model.get_output_embeddings().weight and head["weight_decay"] == 0.05


# ------------------------------------------------------------------------------------------------------ the switch
@pytest.mark.parametrize("set_to_none", [True, False])
def test_only_active_layers_and_always_on_modules_change(set_to_none):
    model = tiny_llama()
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=2, seed=3, state_policy="keep"))
    always = {n for n, _ in model.named_parameters() if layer_of(n) is None}
    assert always == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    periods = set()
    for step in range(8):
        before = snapshot(model)
        train_step(model, opt, ctrl, step, set_to_none=set_to_none)
        active = set(ctrl.active_layers)
        periods.add(ctrl.active_layers)
        for name, p in model.named_parameters():
            layer = layer_of(name)
            changed = not torch.equal(p, before[name])
            if layer is None or layer in active:
                assert changed, f"step {step}: {name} should have trained (active {sorted(active)})"
            else:
                assert not changed, f"step {step}: frozen {name} changed (active {sorted(active)})"
                assert not p.requires_grad and p.grad is None
    assert len(periods) > 1, "the schedule never switched"


def test_every_layer_trains_over_enough_periods():
    model = tiny_llama()
    initial = snapshot(model)
    opt = build_optimizer(model, lr=1e-2)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=1, interval_steps=1, seed=0, state_policy="reset"))
    assert ctrl.active_layers != (0,), "pick a seed whose first period is not layer 0"
    seen = set()
    for step in range(12):
        train_step(model, opt, ctrl, step)
        seen.update(ctrl.active_layers)
    assert seen == set(range(N_LAYERS))
    for name, p in model.named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} never trained"


def test_parameters_outside_layers_and_always_on_stay_frozen():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=16, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = snapshot(model)
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=1, interval_steps=1, state_policy="keep"))
    assert ctrl.frozen_parameter_names == ["transformer.wpe.weight"]  # learned positions: not E, H or norm
    for step in range(2):
        train_step(model, opt, ctrl, step)
    assert not model.transformer.wpe.weight.requires_grad
    assert torch.equal(model.transformer.wpe.weight, before["transformer.wpe.weight"])
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])  # tied to the head


@pytest.mark.parametrize("policy", ["park", "reset", "keep"])
def test_optimizer_state_follows_policy(policy):
    model = tiny_llama()
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=1, interval_steps=2, seed=1, state_policy=policy))
    ever = set()
    for step in range(10):
        train_step(model, opt, ctrl, step)
        ever.update(ctrl.active_layers)
        held = state_layers(ctrl, opt)
        if policy == "keep":
            assert held == ever
        else:
            assert held == set(ctrl.active_layers), f"step {step}: state held for {held}"
    assert len(ever) > 2
    always = [p for m in ctrl.always_trainable.values() for p in m.parameters()]
    assert all(on_device(opt, p) for p in always)


def test_park_is_bit_identical_to_keep_and_reset_is_not():
    # Parking only moves the moments; a parked layer resumes exactly where it stopped.
    finals = {}
    for policy in ("keep", "park", "reset"):
        model = tiny_llama()
        opt = make_optimizer(model)
        ctrl = LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=2, seed=5, state_policy=policy))
        for step in range(10):
            train_step(model, opt, ctrl, step)
        finals[policy] = snapshot(model)
    assert all(torch.equal(finals["keep"][n], finals["park"][n]) for n in finals["keep"])
    assert any(not torch.equal(finals["keep"][n], finals["reset"][n]) for n in finals["keep"])


@pytest.mark.parametrize("prefetch_steps", [0, 1, 2])
def test_hooks_park_unpark_and_prefetch_ahead_of_the_switch(prefetch_steps):
    K = 4
    model = tiny_llama()
    opt = make_optimizer(model)
    calls = record_parker_calls(opt)
    cfg = LisaConfig(n_active_layers=2, interval_steps=K, seed=2, prefetch_steps=prefetch_steps)
    ctrl = LisaController(model, opt, cfg)
    ids = {id(p): i for i in range(N_LAYERS) for p in ctrl.layer_parameters(i)}
    layers_in = lambda params: {ids[id(p)] for p in params}
    log = []
    for step in range(3 * K):
        calls.clear()
        train_step(model, opt, ctrl, step)
        log.append((step, [(kind, layers_in(params)) for kind, params in calls]))

    schedule = [ctrl.sampler.layers_for_period(p) for p in range(3)]
    for step, calls in log:
        period, offset = divmod(step, K)
        expected = []
        if offset == 0 and period > 0:
            old, new = set(schedule[period - 1]), set(schedule[period])
            expected += [("park", old - new)] if old - new else []
            expected += [("unpark", new - old)] if new - old else []
        incoming = set(schedule[period + 1]) - set(schedule[period]) if period + 1 < 3 else set()
        if prefetch_steps and offset == K - prefetch_steps and incoming:
            expected.append(("prefetch", incoming))
        assert calls == expected, f"step {step}"


# --------------------------------------------------------------------------------------------------- update norms
def test_period_log_records_update_norms():
    K = 3
    model = tiny_llama()
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=K, seed=4, state_policy="keep"))
    starts = {}
    for step in range(2 * K + 1):  # two full periods and the first step of a third
        if step % K == 0:
            starts[step // K] = snapshot(model)
        train_step(model, opt, ctrl, step)
    ctrl.finish(2 * K)
    end = snapshot(model)
    log = ctrl.period_log
    assert [e["period"] for e in log] == [0, 1, 2]
    assert [e["partial"] for e in log] == [False, False, True]
    assert [(e["first_step"], e["last_step"]) for e in log] == [(0, K - 1), (K, 2 * K - 1), (2 * K, 2 * K)]
    json.dumps(log)
    # Check period 1 against norms computed here from the weights at its start and end (period 2's start).
    entry, before, after = log[1], starts[1], starts[2]
    assert entry["layers"] == list(ctrl.sampler.layers_for_period(1))
    for layer, norm in zip(entry["layers"], entry["layer_update_norms"]):
        names = [n for n in before if layer_of(n) == layer]
        expected = math.sqrt(sum(((after[n] - before[n]).double() ** 2).sum().item() for n in names))
        assert norm == pytest.approx(expected, rel=1e-5) and norm > 0
    assert set(entry["module_update_norms"]) == {"model.embed_tokens", "lm_head", "model.norm"}
    expected = (after["lm_head.weight"] - before["lm_head.weight"]).double().norm().item()
    assert entry["module_update_norms"]["lm_head"] == pytest.approx(expected, rel=1e-5)
    assert log[2]["module_update_norms"]["model.norm"] == pytest.approx(
        (end["model.norm.weight"] - starts[2]["model.norm.weight"]).double().norm().item(), rel=1e-5)


def test_period_log_without_update_norms():
    model = tiny_llama()
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=2, track_update_norms=False))
    for step in range(4):
        train_step(model, opt, ctrl, step)
    assert [(e["period"], e["layers"], e["layer_update_norms"]) for e in ctrl.period_log] == [
        (p, list(ctrl.sampler.layers_for_period(p)), None) for p in range(2)]


# ---------------------------------------------------------------------------------------------- ranks and resume
def test_two_simulated_ranks_agree():
    ranks = []
    for _ in range(2):
        model = tiny_llama()
        opt = make_optimizer(model)
        ranks.append((model, opt, LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=2, seed=9))))
    for step in range(8):
        for model, opt, ctrl in ranks:
            train_step(model, opt, ctrl, step)
        assert ranks[0][2].active_layers == ranks[1][2].active_layers
    a, b = (snapshot(r[0]) for r in ranks)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert ranks[0][2].period_log == ranks[1][2].period_log


def test_under_distributed_data_parallel(tmp_path):
    # A one-process gloo group: DDP must accept layers that stop producing gradients mid-run (Axolotl's "parameters
    # that were not used in producing loss"), given find_unused_parameters=True, and the controller must see
    # through the wrapper to the model's embeddings and head.
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny_llama()
        before = snapshot(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = make_optimizer(model)
        ctrl = LisaController(ddp, opt, LisaConfig(n_active_layers=1, interval_steps=1, seed=3))
        assert list(ctrl.always_trainable) == ["model.embed_tokens", "lm_head", "model.norm"]
        seen = set()
        for step in range(3):  # layers 0, 3, 1 with this seed: layer 2 must stay untouched
            train_step(ddp, opt, ctrl, step)
            seen.update(ctrl.active_layers)
        after = snapshot(model)
        assert seen == {0, 1, 3}
        for name in after:
            assert torch.equal(after[name], before[name]) == (layer_of(name) not in seen | {None}), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("policy, park_on_load", [("park", False), ("park", True), ("keep", False)])
def test_resume_from_state_dict_equals_uninterrupted(policy, park_on_load):
    cfg = LisaConfig(n_active_layers=2, interval_steps=3, seed=11, state_policy=policy)
    total, stop = 10, 4  # stop in the middle of period 1

    model = tiny_llama()
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, cfg)
    schedule = []
    for step in range(total):
        train_step(model, opt, ctrl, step)
        schedule.append(ctrl.active_layers)
    uninterrupted = snapshot(model)

    model = tiny_llama()
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, cfg)
    for step in range(stop):
        train_step(model, opt, ctrl, step)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctrl.state_dict()))
    json.dumps(saved[2])  # plain types only

    model = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(saved[0])
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, cfg, start_step=stop)
    if park_on_load:
        # The memory-friendly order: the controller first (frozen layers known), then the optimizer sends the
        # frozen layers' saved moments straight to the bank, so the full state never sits on the device.
        ctrl.load_state_dict(saved[2])
        opt.load_state_dict(saved[1], park="frozen")
        assert state_layers(ctrl, opt) == set(ctrl.active_layers)
    else:
        opt.load_state_dict(saved[1])
        ctrl.load_state_dict(saved[2])
    resumed = schedule[:stop]
    for step in range(stop, total):
        train_step(model, opt, ctrl, step)
        resumed.append(ctrl.active_layers)
    assert resumed == schedule
    final = snapshot(model)
    assert all(torch.equal(final[n], uninterrupted[n]) for n in final)
    if policy == "park":
        assert state_layers(ctrl, opt) == set(ctrl.active_layers)


def test_load_state_dict_refuses_a_different_schedule():
    model = tiny_llama()
    opt = make_optimizer(model)
    state = LisaController(model, opt, LisaConfig(n_active_layers=2, seed=1)).state_dict()
    other = LisaController(model, opt, LisaConfig(n_active_layers=2, seed=2))
    with pytest.raises(ValueError, match="written with seed=1 but this run has seed=2"):
        other.load_state_dict(state)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parking_frees_device_memory_on_cuda():
    # After every layer has trained once, "keep" holds moments for all 8 layers on the GPU; "park" for the 2
    # active ones and the next period's prefetched ones only. The difference in allocated memory is at least the
    # parked layers' fp32 moments.
    import gc

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
                                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    held, finals = {}, {}
    for policy in ("keep", "park"):
        gc.collect()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).cuda()
        opt = build_optimizer(model, lr=1e-3)
        ctrl = LisaController(model, opt, LisaConfig(n_active_layers=2, interval_steps=1, seed=0, state_policy=policy))
        seen = set()
        for step in range(12):
            ctrl.on_step_begin(step)
            ids = batch(step).cuda()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ctrl.on_step_end(step)
            seen.update(ctrl.active_layers)
        torch.cuda.synchronize()
        held[policy] = torch.cuda.memory_allocated() - start
        finals[policy] = {n: p.detach().cpu() for n, p in model.named_parameters()}
        assert seen == set(range(8))
        # prefetch_steps=1 already brought the next period's incoming layers back: they are on the device too.
        resident = set(ctrl.active_layers) | set(ctrl.sampler.layers_for_period(ctrl.period + 1))
        parked_bytes = sum(2 * 4 * p.numel() for i in set(range(8)) - resident for p in ctrl.layer_parameters(i))
        del model, opt, ctrl
    assert held["keep"] - held["park"] >= parked_bytes
    assert all(torch.equal(finals["keep"][n], finals["park"][n]) for n in finals["keep"])

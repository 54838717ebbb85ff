"""Sampling rules beyond uniform layers: zero-weight layers, module-wise sampling (MISA) and outlier-weighted layers
(OWS), on the tiny Llama of `controller_run` with the real FusedAdamW."""

import copy
import json

import pytest
import torch

from lisa_trainer import LisaConfig, LisaController
from controller_run import (
    N_LAYERS,
    layer_of,
    make_optimizer,
    on_device,
    snapshot,
    tiny_llama,
    train_step,
)

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


# ------------------------------------------------------------------------------------------------ importance weights
def test_zero_weight_layers_never_train():
    model = tiny_llama()
    initial = snapshot(model)
    opt = make_optimizer(model)
    cfg = LisaConfig(n_active_layers=1, interval_steps=1, seed=0, layer_weights=[0, 1, 0, 3], state_policy="reset")
    ctrl = LisaController(model, opt, cfg)
    seen = set()
    for step in range(10):
        train_step(model, opt, ctrl, step)
        seen.update(ctrl.active_layers)
    assert seen == {1, 3}
    final = snapshot(model)
    for name in final:
        if layer_of(name) in (0, 2):
            assert torch.equal(final[name], initial[name]), name
        elif layer_of(name) in (1, 3):
            assert not torch.equal(final[name], initial[name]), name


# -------------------------------------------------------------------------------------------- module-wise (MISA)
def module_run(policy="park", steps=12, **fields):
    model = tiny_llama()
    opt = make_optimizer(model)
    cfg = LisaConfig(n_active_layers=1, interval_steps=2, seed=5, state_policy=policy, granularity="module", **fields)
    ctrl = LisaController(model, opt, cfg)
    history = []
    for step in range(steps):
        before = snapshot(model)
        train_step(model, opt, ctrl, step)
        history.append((ctrl.active_modules, before, snapshot(model)))
    return model, opt, ctrl, history


def test_module_units_are_found_by_structure_and_fill_the_budget():
    model, opt, ctrl, history = module_run()
    layer = ctrl.layers[0]
    # q/k/v/o, gate/up/down and two norms per Llama layer, named by their path inside the layer.
    assert [n.partition(".")[2] for n in ctrl.module_names[:9]] == [
        path for path, m in layer.named_modules() if next(m.parameters(recurse=False), None) is not None]
    assert len(ctrl.module_names) == 9 * N_LAYERS
    budget = sum(p.numel() for p in layer.parameters())  # γ=1 whole layer
    assert ctrl.module_sampler.budget == budget
    sizes = dict(zip(ctrl.module_names, ctrl.module_sampler.sizes))
    for entry in ctrl.period_log:
        assert sum(sizes[m] for m in entry["modules"]) <= budget
        assert entry["layers"] == sorted({int(m.split(".")[0]) for m in entry["modules"]})
        assert len(entry["module_grad_norms"]) == len(entry["modules"]) and entry["always_grad_norm"] > 0
    assert len({tuple(e["modules"]) for e in ctrl.period_log}) > 1
    # A small budget still trains something and never overflows.
    small = module_run(steps=4, module_budget=max(ctrl.module_sampler.sizes))[2]
    assert all(sum(sizes[m] for m in e["modules"]) <= max(ctrl.module_sampler.sizes) for e in small.period_log)


def test_frozen_modules_get_no_update_and_active_ones_do():
    model, opt, ctrl, history = module_run()
    owner = {id(p): name for name, ps in zip(ctrl.module_names, ctrl._unit_params) for p in ps}
    names = {id(p): n for n, p in model.named_parameters()}
    for active, before, after in history:
        for p in model.parameters():
            module = owner.get(id(p))
            if module is None:
                continue  # embeddings, head and final norm train in every period
            changed = not torch.equal(before[names[id(p)]], after[names[id(p)]])
            assert changed == (module in active), (module, active)


def test_module_parking_is_bit_identical_to_keep():
    kept = module_run("keep")
    parked = module_run("park")
    assert [h[0] for h in kept[3]] == [h[0] for h in parked[3]]
    a, b = snapshot(kept[0]), snapshot(parked[0])
    assert all(torch.equal(a[n], b[n]) for n in a)
    ctrl, opt = parked[2], parked[1]
    active = {id(p) for u in ctrl.active_units for p in ctrl._unit_params[u]}
    held = {id(p) for ps in ctrl._unit_params for p in ps if on_device(opt, p)}
    assert held == active and ctrl.parker.parked_params  # frozen modules' moments sit in the host bank


def test_module_schedule_is_the_same_on_every_rank_and_after_a_resume():
    cfg = LisaConfig(n_active_layers=1, interval_steps=3, seed=11, granularity="module")
    total, stop = 15, 7  # stop in the middle of period 2
    ranks = []
    for _ in range(2):
        model = tiny_llama()
        opt = make_optimizer(model)
        ranks.append((model, opt, LisaController(model, opt, cfg), []))
    for step in range(total):
        for model, opt, ctrl, schedule in ranks:
            train_step(model, opt, ctrl, step)
            schedule.append(ctrl.active_modules)
            if step == stop - 1 and schedule is ranks[0][3]:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctrl.state_dict()))
    assert ranks[0][3] == ranks[1][3] and ranks[0][2].period_log == ranks[1][2].period_log
    # Importance weights change the draws once the log has norms: the schedule is not the unweighted one.
    ctrl = ranks[0][2]
    assert any(ctrl.module_sampler.modules_for_period(p) != ctrl.units_for_period(p) for p in range(2, 8))

    json.dumps(saved[2])
    model = tiny_llama(seed=123)
    model.load_state_dict(saved[0])
    opt = make_optimizer(model)
    resumed_ctrl = LisaController(model, opt, cfg, start_step=stop)
    opt.load_state_dict(saved[1])
    resumed_ctrl.load_state_dict(saved[2])
    resumed = ranks[0][3][:stop]
    for step in range(stop, total):
        train_step(model, opt, resumed_ctrl, step)
        resumed.append(resumed_ctrl.active_modules)
    assert resumed == ranks[0][3]
    keys = ("modules", "module_grad_norms", "always_grad_norm")
    assert [[e[k] for k in keys] for e in resumed_ctrl.period_log] == [[e[k] for k in keys] for e in ctrl.period_log]
    final, uninterrupted = snapshot(model), snapshot(ranks[0][0])
    assert all(torch.equal(final[n], uninterrupted[n]) for n in final)


@pytest.mark.parametrize("fields, match", [
    ({"granularity": "block"}, "granularity must be one of"),
    ({"module_budget": 10}, "module_budget applies to LisaConfig.granularity='module' only"),
    ({"granularity": "module", "module_budget": 0}, "module_budget must be None or a positive int"),
    ({"granularity": "module", "layer_weights": "auto"}, "takes neither LisaConfig.layer_weights"),
    ({"granularity": "module", "sampling": "balanced"}, "takes neither"),
])
def test_module_config_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        LisaConfig(**fields)


def test_module_budget_below_the_largest_module_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"module_budget \(100\) is smaller than the largest decoder module"):
        LisaController(model, make_optimizer(model), LisaConfig(granularity="module", module_budget=100))


def test_outlier_layer_weights_are_computed_once_from_the_weights():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, :4] = 5.0  # std 0.02 elsewhere: 4 outliers, in layer 2 only
    opt = make_optimizer(model)
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=1, interval_steps=1, layer_weights="outlier"))
    assert ctrl.sampler.weights == pytest.approx([0.025, 0.025, 0.925, 0.025])
    assert ctrl.state_dict()["layer_weights"] == "outlier"
    counts = [0] * N_LAYERS
    for step in range(20):
        train_step(model, opt, ctrl, step)
        counts[ctrl.active_layers[0]] += 1
    assert counts[2] > 10

"""LayerSampler: a pure, seeded function of the period; uniform, importance-weighted or coverage-balanced;
auto_layer_weights: importance weights from the recorded update norms."""

import json
import math
import random
from itertools import combinations

import pytest
import torch

from lisa_trainer import LayerSampler
from lisa_trainer.layers import outlier_ratios
from lisa_trainer.sampler import ModuleSampler, auto_layer_weights, module_importance, outlier_layer_weights


def test_pure_function_of_seed_and_period():
    a = LayerSampler(32, 4, seed=7)
    first = [a.layers_for_period(p) for p in range(50)]
    # Global RNG state, call order and a fresh instance change nothing.
    torch.manual_seed(123)
    random.seed(123)
    b = LayerSampler(32, 4, seed=7)
    assert [b.layers_for_period(p) for p in reversed(range(50))][::-1] == first
    assert a.layers_for_period(17) == first[17]
    for layers in first:
        assert len(layers) == 4 and len(set(layers)) == 4 and list(layers) == sorted(layers)
        assert all(0 <= i < 32 for i in layers)
    other_seed = [LayerSampler(32, 4, seed=8).layers_for_period(p) for p in range(50)]
    assert other_seed != first
    assert len(set(first)) > 40  # periods differ from one another


def test_schedule_is_pinned():
    # Resuming with a newer lisa-kernels, torch or Python must continue the same schedule: BLAKE2b keys only.
    assert [LayerSampler(8, 2, seed=0).layers_for_period(p) for p in range(6)] == [
        (2, 6), (1, 3), (4, 7), (0, 3), (6, 7), (2, 7)]


def test_uniform_subsets_are_equally_likely():
    n, k, periods = 5, 2, 20_000
    sampler = LayerSampler(n, k, seed=1)
    counts = {c: 0 for c in combinations(range(n), k)}
    for p in range(periods):
        counts[sampler.layers_for_period(p)] += 1
    expected = periods / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    # 9 degrees of freedom: P(chi2 > 27.9) = 0.001. Deterministic (fixed seed), so no flakiness either way.
    assert chi2 < 27.9, counts


def test_weighted_sampling_follows_successive_draws():
    weights = [0.0, 1.0, 2.0, 0.0, 5.0]
    sampler = LayerSampler(5, 2, seed=3, weights=weights)
    freq = sampler.inclusion_probabilities(20_000)
    assert freq[0] == 0.0 and freq[3] == 0.0  # zero weight: never chosen
    # P(i in a 2-subset drawn successively without replacement) = w_i/W + sum_j w_j/W * w_i/(W - w_j).
    total = sum(weights)
    for i, w in enumerate(weights):
        exact = w / total + sum(wj / total * w / (total - wj) for j, wj in enumerate(weights) if j != i and wj)
        assert abs(freq[i] - exact) < 4 * math.sqrt(exact * (1 - exact) / 20_000) + 1e-12, (i, freq[i], exact)


def test_exactly_enough_nonzero_weights_always_picks_them():
    sampler = LayerSampler(6, 2, seed=0, weights=[0, 3, 0, 0, 1e-9, 0])
    assert {sampler.layers_for_period(p) for p in range(100)} == {(1, 4)}


def test_all_layers_active():
    assert LayerSampler(3, 3, seed=0).layers_for_period(5) == (0, 1, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_layers=0, n_active=1, seed=0), "n_layers"),
    (dict(n_layers=4, n_active=0, seed=0), "n_active"),
    (dict(n_layers=4, n_active=5, seed=0), "n_active"),
    (dict(n_layers=4, n_active=2, seed=1.0), "seed"),
    (dict(n_layers=4, n_active=2, seed=0, weights=[1, 1, 1]), "weights must have one entry per layer"),
    (dict(n_layers=4, n_active=2, seed=0, weights=[1, 1, -1, 1]), r"weights .*non-negative.*\[2\]"),
    (dict(n_layers=4, n_active=2, seed=0, weights=[1, math.inf, 1, 1]), r"weights .*finite.*\[1\]"),
    (dict(n_layers=4, n_active=2, seed=0, weights=[0, 0, 1, 0]), "weights has 1 non-zero entries"),
    (dict(n_layers=4, n_active=2, seed=0, weights=["a", 1, 1, 1]), "weights must be a sequence"),
    (dict(n_layers=4, n_active=2, seed=0, mode="random"), "mode must be one of"),
    (dict(n_layers=4, n_active=2, seed=0, weights=[1, 1, 1, 1], mode="balanced"), "balanced.*no weights"),
])
def test_validation_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSampler(**kwargs)


def test_period_must_be_non_negative_int():
    sampler = LayerSampler(4, 2, seed=0)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="period"):
            sampler.layers_for_period(bad)


# ------------------------------------------------------------------------------------------- coverage-balanced
@pytest.mark.parametrize("n, k", [(8, 2), (8, 3), (6, 4), (7, 1), (32, 4), (5, 5)])
def test_balanced_gives_every_layer_equal_counts_over_each_cycle(n, k):
    sampler = LayerSampler(n, k, seed=4, mode="balanced")
    cycle = sampler.cycle_length()
    assert cycle == n // math.gcd(n, k)
    for c in range(6):
        counts = [0] * n
        for p in range(c * cycle, (c + 1) * cycle):
            layers = sampler.layers_for_period(p)
            assert len(layers) == k and len(set(layers)) == k and list(layers) == sorted(layers)
            for i in layers:
                counts[i] += 1
        assert counts == [k // math.gcd(n, k)] * n, (c, counts)


def test_balanced_is_a_pure_function_of_seed_and_period():
    first = [LayerSampler(8, 3, seed=2, mode="balanced").layers_for_period(p) for p in range(40)]
    torch.manual_seed(5)
    random.seed(5)
    again = LayerSampler(8, 3, seed=2, mode="balanced")
    assert [again.layers_for_period(p) for p in reversed(range(40))][::-1] == first
    assert [LayerSampler(8, 3, seed=3, mode="balanced").layers_for_period(p) for p in range(40)] != first
    cycles = [tuple(first[c * 8:(c + 1) * 8]) for c in range(5)]
    assert len(set(cycles)) == 5  # each cycle is a fresh permutation
    # Pinned like the uniform schedule: a resumed run with newer versions continues the same schedule.
    assert [LayerSampler(8, 2, seed=0, mode="balanced").layers_for_period(p) for p in range(4)] == [
        (0, 1), (4, 5), (2, 3), (6, 7)]


# ------------------------------------------------------------------------------------------------ auto weights
def _entry(period, layers, norms, module_norm=1.0, steps=10):
    return {"period": period, "first_step": period * steps, "last_step": period * steps + steps - 1,
            "partial": False, "layers": list(layers), "layer_update_norms": list(norms),
            "module_update_norms": {"model.embed_tokens": module_norm}}


LOG = [_entry(0, (0, 1), (4.0, 1.0)), _entry(1, (2, 3), (1.0, 1.0), module_norm=0.5),
       _entry(2, (0, 2), (2.0, 0.5)), _entry(3, (1, 4), (0.1, 1.0))]


def test_auto_weights_are_deterministic_and_use_only_periods_two_back():
    n = 6
    assert auto_layer_weights(LOG, n, 0) is None and auto_layer_weights(LOG, n, 1) is None  # nothing ended yet
    w = auto_layer_weights(LOG, n, 4)  # periods 0..2
    assert w == auto_layer_weights(list(reversed(LOG)), n, 4)  # order of the log does not matter
    assert w == auto_layer_weights(json.loads(json.dumps(LOG)), n, 4)  # survives a JSON/checkpoint round trip
    assert w == auto_layer_weights(LOG[:3], n, 4)  # period 3 has not counted yet
    assert w != auto_layer_weights(LOG, n, 5)
    assert sum(w) == pytest.approx(1.0)
    # Layer 0: 4/1 then 2/1, smoothed 0.5 -> 3; layers 2, 3: 1/0.5 = 2 then 0.5 -> 1.25 for layer 2.
    est = [3.0, 1.0, 1.25, 2.0]
    fill = sum(est) / 4
    est += [fill, fill]  # layers 4, 5 not observed: the mean of the others
    expected = [0.5 / n + 0.5 * x / sum(est) for x in est]
    assert w == pytest.approx(expected)


@pytest.mark.parametrize("floor", [0.5, 0.1, 1.0])
def test_auto_weights_never_starve_a_layer(floor):
    log = [_entry(p, (0, 1), (1e6, 0.0)) for p in range(10)]  # layer 1 never moves, layer 0 moves a lot
    w = auto_layer_weights(log, 8, 12, floor=floor)
    assert min(w) >= floor / 8 - 1e-15 and all(x > 0 for x in w)
    assert w[0] == max(w) and w[1] == min(w)
    sampler = LayerSampler(8, 2, seed=0)
    chosen = {i for p in range(400) for i in sampler.layers_for_period(p, w)}
    assert chosen == set(range(8))


def test_auto_weights_without_modules_scale_by_steps_and_reject_bad_knobs():
    entry = _entry(2, (0, 1), (2.0, 1.0))
    entry["module_update_norms"] = {}
    w = auto_layer_weights([entry], 2, 4, floor=0.5)
    assert w == pytest.approx((0.25 + 0.5 * 2 / 3, 0.25 + 0.5 / 3))
    for kwargs in (dict(floor=0.0), dict(floor=1.5), dict(smoothing=0.0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            auto_layer_weights([entry], 2, 4, **kwargs)


def test_layers_for_period_checks_per_period_weights():
    sampler = LayerSampler(4, 2, seed=0)
    with pytest.raises(ValueError, match="one entry per layer"):
        sampler.layers_for_period(0, [1, 1, 1])
    assert sampler.layers_for_period(3, [0, 1, 0, 1]) == (1, 3)


# ------------------------------------------------------------------------------------------------- module-wise
def test_module_sampler_is_pure_and_respects_the_budget():
    sizes = [64, 64, 16, 128, 8, 8, 64, 64, 16, 128, 8, 8]
    a, b = ModuleSampler(sizes, budget=200, seed=3), ModuleSampler(sizes, budget=200, seed=3)
    weights = [1.0 + i % 3 for i in range(len(sizes))]
    for period in range(200):
        chosen = a.modules_for_period(period, weights)
        assert chosen == b.modules_for_period(period, weights) == tuple(sorted(set(chosen)))
        total = sum(sizes[i] for i in chosen)
        assert total <= 200
        # Filled: nothing left out would still fit.
        assert all(total + sizes[i] > 200 for i in range(len(sizes)) if i not in chosen)
    assert len({a.modules_for_period(p) for p in range(50)}) > 10
    assert ModuleSampler(sizes, 200, seed=4).modules_for_period(0) != a.modules_for_period(0) or \
        ModuleSampler(sizes, 200, seed=4).modules_for_period(1) != a.modules_for_period(1)


def test_module_sampler_favours_heavy_modules():
    sizes = [10] * 6
    s = ModuleSampler(sizes, budget=20, seed=0)
    counts = [0] * 6
    for period in range(3000):
        for i in s.modules_for_period(period, [4, 1, 1, 1, 1, 1]):
            counts[i] += 1
    assert counts[0] > 2 * max(counts[1:])


@pytest.mark.parametrize("kwargs, match", [
    ({"sizes": [], "budget": 1, "seed": 0}, "sizes must be"),
    ({"sizes": [4, 8], "budget": 7, "seed": 0}, "at least the largest module's 8 parameters"),
    ({"sizes": [4], "budget": 4, "seed": "0"}, "seed must be an int"),
])
def test_module_sampler_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModuleSampler(**kwargs)


def test_module_importance_uses_gradient_norms_two_periods_back_with_a_floor():
    index = {"0.q": 0, "0.k": 1, "1.q": 2}

    def entry(period, modules, norms, always=2.0):
        return {"period": period, "first_step": 3 * period, "last_step": 3 * period + 2, "modules": modules,
                "module_grad_norms": norms, "always_grad_norm": always}

    log = [entry(0, ["0.q", "0.k"], [2.0, 6.0]), entry(1, ["1.q"], [100.0])]
    assert module_importance(log, index, 1) is None  # nothing from period <= -1
    w = module_importance(log, index, 2)  # period 0 only: 1.0, 3.0, and 1.q the mean of the two
    assert w == pytest.approx([0.5 / 3 + 0.5 * 1 / 6, 0.5 / 3 + 0.5 * 3 / 6, 0.5 / 3 + 0.5 * 2 / 6])
    later = module_importance(log + [entry(2, ["0.q"], [6.0], always=1.0)], index, 4)
    # 0.q: 1.0 then 6.0, smoothed halfway: 3.5; 0.k 3.0; 1.q 50.0
    assert later == pytest.approx([0.5 / 3 + 0.5 * x / 56.5 for x in (3.5, 3.0, 50.0)])
    assert min(later) >= 0.5 / 3


# ------------------------------------------------------------------------------------------------- outlier (OWS)
def test_outlier_weights_equal_a_hand_computation():
    layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5)) for _ in range(3))
    with torch.no_grad():
        for layer in layers:
            layer[0].weight.fill_(1.0)
            layer[0].bias.fill_(1e6)  # 1-D: not counted
            layer[1].weight.fill_(1e6)
        layers[0][0].weight[0, 0] = 100.0  # mean (19 + 100) / 20 = 5.95; 100 > 7 * 5.95 = 41.65: 1 of 20
        layers[1][0].weight[0, :2] = 200.0  # mean (18 + 400) / 20 = 20.9; 200 > 7 * 20.9 = 146.3: 2 of 20
        layers[2][0].weight[1, :3] = -100.0  # |.|: mean (17 + 300) / 20 = 15.85; 100 < 7 * 15.85 = 110.95: none
    assert outlier_ratios(layers) == [1 / 20, 2 / 20, 0.0]
    # Mixed with uniform: floor 0.1 -> 0.1 / 3 + 0.9 * ratio / sum(ratios).
    assert outlier_layer_weights(layers) == pytest.approx([0.1 / 3 + 0.3, 0.1 / 3 + 0.6, 0.1 / 3])
    # M = 13 (OWS's value with activation norms): 100 > 77.35 in layer 0 only; 200 < 271.7 in layer 1.
    assert outlier_ratios(layers, threshold=13.0) == [1 / 20, 0.0, 0.0]
    with torch.no_grad():
        for layer in layers:
            layer[0].weight.fill_(1.0)
    assert outlier_layer_weights(layers) is None  # no outliers anywhere: uniform

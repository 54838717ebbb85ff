"""LayerSampler: a pure, seeded function of the period; uniform or importance-weighted without replacement."""

import math
import random
from itertools import combinations

import pytest
import torch

from lisa_trainer import LayerSampler


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
])
def test_validation_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerSampler(**kwargs)


def test_period_must_be_non_negative_int():
    sampler = LayerSampler(4, 2, seed=0)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="period"):
            sampler.layers_for_period(bad)

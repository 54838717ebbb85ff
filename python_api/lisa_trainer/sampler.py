"""Which decoder layers train in which LISA period: a pure function of (seed, period).

Every rank of a distributed run, a resumed run and the prefetcher (which must know period p+1 during period p)
ask the same question and must get the same answer without sharing any state, so nothing here touches a global
RNG or keeps a stream position. Each (seed, period, layer) triple is hashed with BLAKE2b into a uniform number;
the answer depends only on those bytes, not on the torch or Python version.

Sampling without replacement uses exponential keys (Efraimidis & Spirakis 2006): layer i gets
key_i = -ln(u_i) / w_i and the `n_active` smallest keys win. That is exactly sequential weighted sampling
without replacement (draw one layer with probability proportional to w, remove it, repeat); with equal weights
it is a uniform random subset, the paper's rule. A zero weight gives an infinite key: never chosen.

Two further rules, both measured in `benchmarks/bench_quality.py` (see docs/quality.md):

- `mode="balanced"`: coverage-balanced sampling. Consecutive periods take consecutive slices of a seeded
  permutation of the layers, so over a cycle of n_layers / gcd(n_layers, n_active) periods every layer trains in
  exactly n_active / gcd(...) of them (independent draws leave some layers idle for many periods by chance).
- `auto_layer_weights(period_log, ...)`: importance weights estimated from the update norms the controller records
  each period, smoothed, with a floor so no layer starves. They depend only on periods that ended at least one
  period earlier, so the prefetcher knows period p+1 during period p, and the log is in every checkpoint.
- `outlier_layer_weights(layers)`: OWS (Li et al. 2024, arXiv 2405.18380), each layer weighted by its share of
  outlier weights, computed once from the weights.

And module-wise sampling (MISA, Liu et al. 2025, arXiv 2511.00056): `ModuleSampler` fills a budget of trainable
parameters with modules inside the decoder layers (attention projections, MLP matrices, norms), drawn with the same
exponential keys, weighted by `module_importance(period_log, ...)` from the gradient norms the controller logs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .layers import outlier_ratios
from .runlog import read_log

__all__ = ["LAYER_WEIGHT_RULES", "LayerSampler", "ModuleSampler", "SAMPLING_MODES", "auto_layer_weights",
           "module_importance", "outlier_layer_weights"]

SAMPLING_MODES = ("uniform", "balanced")
# auto_layer_weights: every layer keeps at least this share of a uniform draw's weight (0.5: no layer is sampled
# less than half as often as uniform sampling would), and each new observation of a layer moves its estimate
# halfway (a layer trains about every n_layers / n_active periods, so older periods soon stop counting).
AUTO_FLOOR = 0.5
AUTO_SMOOTHING = 0.5
AUTO_WINDOW = 256  # periods looked back over: bounds the cost per period in long runs
LAYER_WEIGHT_RULES = ("auto", "outlier")
# outlier_layer_weights (`layers.outlier_ratios` counts). OWS follows OWL (Yin et al. 2023, arXiv 2310.05175): the
# outlier score of weight W_ij is ||X_j||_2 * |W_ij| and a weight is an outlier when its score exceeds M times the
# mean score of its layer; a layer's sampling probability is its outlier ratio over the sum of all layers' ratios.
# OWS's code samples Llama-2-7B with M = 13 (ratios from 0.018 % in layer 27 to 0.30 % in layer 1). Here the score
# is |W_ij| alone (no calibration data exists when training starts): without the activation norms' heavy tail,
# M = 13 marks no weight at all in bench_quality's pretrained model, M = 7 marks 0 to 0.16 % per layer, the paper's
# range, so M = 7 (`layers.OUTLIER_THRESHOLD`). Every layer keeps OUTLIER_FLOOR of its uniform share, so a layer
# without outliers still trains now and then.
OUTLIER_FLOOR = 0.1

_TWO_POW_53 = float(1 << 53)


def _uniform(*key) -> float:
    """A uniform number in (0, 1) determined by `key` alone ((seed, period, layer) for independent draws)."""
    digest = hashlib.blake2b(("lisa:" + ":".join(map(str, key))).encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "little") >> 11) + 0.5) / _TWO_POW_53  # 53 random bits, never 0 or 1


class LayerSampler:
    """Choose `n_active` of `n_layers` decoder layers for each period: independent uniform draws (the paper's
    rule), importance-weighted draws, or coverage-balanced slices of seeded permutations (`mode="balanced"`).

    >>> s = LayerSampler(n_layers=8, n_active=2, seed=0)
    >>> s.layers_for_period(0) == s.layers_for_period(0)
    True
    """

    def __init__(self, n_layers: int, n_active: int, seed: int, weights: Sequence[float] | None = None,
                 mode: str = "uniform"):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        if isinstance(n_active, bool) or not isinstance(n_active, int) or not 1 <= n_active <= n_layers:
            raise ValueError(f"n_active must be an int in [1, n_layers={n_layers}], got {n_active!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.n_layers = n_layers
        self.n_active = n_active
        self.seed = seed
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        if mode == "balanced" and weights is not None:
            raise ValueError("mode='balanced' gives every layer the same share; it takes no weights")
        self.mode = mode
        self.weights = None if weights is None else self._check_weights(weights, n_layers, n_active)

    @staticmethod
    def _check_weights(weights: Sequence[float], n_layers: int, n_active: int) -> tuple[float, ...]:
        try:
            values = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            raise ValueError(f"weights must be a sequence of {n_layers} numbers, got {weights!r}") from None
        if len(values) != n_layers:
            raise ValueError(f"weights must have one entry per layer ({n_layers}), got {len(values)}")
        bad = [i for i, w in enumerate(values) if not math.isfinite(w) or w < 0]
        if bad:
            raise ValueError(f"weights must be finite and non-negative; bad entries at layers {bad}")
        nonzero = sum(w > 0 for w in values)
        if nonzero < n_active:
            raise ValueError(
                f"weights has {nonzero} non-zero entries but n_active={n_active} layers must be chosen per period "
                f"without replacement"
            )
        return values

    def layers_for_period(self, period: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
        """The sorted layer indices active in `period` (0-based). `weights`, when given, replaces the sampler's own
        for this period (the controller passes `auto_layer_weights`)."""
        if isinstance(period, bool) or not isinstance(period, int) or period < 0:
            raise ValueError(f"period must be a non-negative int, got {period!r}")
        if self.n_active == self.n_layers:
            return tuple(range(self.n_layers))
        if self.mode == "balanced":
            return self._balanced(period)
        if weights is not None:
            weights = self._check_weights(weights, self.n_layers, self.n_active)
        else:
            weights = self.weights
        keys = _draw_order(self.n_layers, weights, (self.seed, period))
        return tuple(sorted(keys[: self.n_active]))

    def cycle_length(self) -> int:
        """Periods after which `mode="balanced"` has given every layer the same number of periods."""
        return self.n_layers // math.gcd(self.n_layers, self.n_active)

    def _balanced(self, period: int) -> tuple[int, ...]:
        cycle, index = divmod(period, self.cycle_length())
        order = self._cycle_order(cycle)
        return tuple(sorted(order[index * self.n_active:(index + 1) * self.n_active]))

    def _cycle_order(self, cycle: int) -> list[int]:
        """n_active / gcd permutations of the layers, end to end; period i of the cycle takes slice i.

        A slice that straddles two permutations takes the tail of one and the head of the next; a layer in both
        would be chosen twice, so such a layer is swapped out of the head with the next layer further on that is
        not in the tail. A swap within a permutation keeps every layer's count per cycle exact."""
        n, k = self.n_layers, self.n_active
        order: list[int] = []
        for j in range(k // math.gcd(n, k)):
            perm = sorted(range(n), key=lambda i: _uniform("balanced", self.seed, cycle, j, i))
            tail = set(order[len(order) - len(order) % k:])
            for pos in range(k - len(tail) if tail else 0):
                if perm[pos] in tail:
                    swap = next(q for q in range(k - len(tail), n) if perm[q] not in tail)
                    perm[pos], perm[swap] = perm[swap], perm[pos]
            order += perm
        return order

    def inclusion_probabilities(self, n_periods: int = 10_000) -> list[float]:
        """Empirical fraction of the first `n_periods` periods in which each layer is active (for diagnostics)."""
        counts = [0] * self.n_layers
        for p in range(n_periods):
            for i in self.layers_for_period(p):
                counts[i] += 1
        return [c / n_periods for c in counts]

    def __repr__(self) -> str:
        w = "" if self.weights is None else f", weights={list(self.weights)}"
        m = "" if self.mode == "uniform" else f", mode={self.mode!r}"
        return f"LayerSampler(n_layers={self.n_layers}, n_active={self.n_active}, seed={self.seed}{w}{m})"


def _draw_order(n: int, weights: Sequence[float] | None, key: tuple) -> list[int]:
    """0..n-1 in the order of sequential weighted sampling without replacement (exponential keys, see above):
    `key` + (i,) seeds item i's uniform number."""
    keys = []
    for i in range(n):
        w = 1.0 if weights is None else weights[i]
        keys.append((math.inf if w == 0 else -math.log(_uniform(*key, i)) / w, i))
    keys.sort()
    return [i for _, i in keys]


class ModuleSampler:
    """Choose modules (units of `sizes[i]` parameters) for each period: weighted sampling without replacement that
    skips a drawn module which would take the period past `budget` parameters and goes on drawing, so the period
    holds at most `budget` trainable parameters. A pure function of (seed, period, weights), as `LayerSampler`.

    >>> s = ModuleSampler(sizes=[4, 4, 1, 4, 4, 1], budget=9, seed=0)
    >>> sum(s.sizes[i] for i in s.modules_for_period(3)) <= 9
    True
    """

    def __init__(self, sizes: Sequence[int], budget: int, seed: int):
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"sizes must be a non-empty sequence of positive ints, got {sizes!r}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < max(sizes):
            raise ValueError(f"budget must be an int of at least the largest module's {max(sizes):,} parameters "
                             f"(else that module never trains), got {budget!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.sizes, self.budget, self.seed = tuple(sizes), budget, seed

    def modules_for_period(self, period: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
        """The sorted module indices active in `period`; `weights` (one per module, positive) as in LayerSampler."""
        if isinstance(period, bool) or not isinstance(period, int) or period < 0:
            raise ValueError(f"period must be a non-negative int, got {period!r}")
        if weights is not None and (len(weights) != len(self.sizes) or not all(w > 0 for w in weights)):
            raise ValueError(f"weights must be {len(self.sizes)} positive numbers, got {weights!r}")
        chosen, total = [], 0
        for i in _draw_order(len(self.sizes), weights, ("module", self.seed, period)):
            if total + self.sizes[i] <= self.budget:
                chosen.append(i)
                total += self.sizes[i]
        return tuple(sorted(chosen))

    def __repr__(self) -> str:
        return f"ModuleSampler({len(self.sizes)} modules, budget={self.budget:,}, seed={self.seed})"


def _mixed_with_uniform(estimates: Sequence[float], floor: float) -> tuple[float, ...]:
    """floor / n + (1 - floor) * estimate_i / sum(estimates): every item keeps `floor` times its uniform share."""
    n, total = len(estimates), sum(estimates)
    return tuple(floor / n + (1 - floor) * x / total for x in estimates)


def _smoothed(observations, n: int, smoothing: float, floor: float) -> tuple[float, ...] | None:
    """Exponential moving average per item of `observations` ((item, value) pairs in time order); an item never
    observed gets the mean of the others; then mixed with uniform (`_mixed_with_uniform`). None: nothing usable."""
    estimate: list[float | None] = [None] * n
    for i, x in observations:
        estimate[i] = x if estimate[i] is None else (1 - smoothing) * estimate[i] + smoothing * x
    seen = [x for x in estimate if x is not None]
    if not seen or sum(seen) <= 0 or not all(math.isfinite(x) for x in seen):
        return None
    fill = sum(seen) / len(seen)
    return _mixed_with_uniform([fill if x is None else x for x in estimate], floor)


def _check_mixing(floor: float, smoothing: float) -> None:
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor!r}")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")


def _entries_before(period_log: Sequence[dict], period: int, key: str) -> list[dict]:
    """Log entries with `key` from periods <= period - 2, in period order. Why two periods back: during period p the
    prefetcher asks for period p+1's units, when period p has not ended yet; both questions must see the same
    observations."""
    last = period - 2
    return sorted((e for e in period_log if last - AUTO_WINDOW < e["period"] <= last and e.get(key)),
                  key=lambda e: (e["period"], e["first_step"]))


def auto_layer_weights(period_log: Sequence[dict], n_layers: int, period: int, *, floor: float = AUTO_FLOOR,
                       smoothing: float = AUTO_SMOOTHING) -> tuple[float, ...] | None:
    """Importance weights for `period` from the update norms observed in periods <= period - 2 (None: no
    observation yet, sample uniformly).

    `period_log` is `LisaController.period_log`: per period its layers, `layer_update_norms` and
    `module_update_norms`. A layer's observation is its update norm divided by the total update norm of the
    always-trainable modules in the same period (they train in every period at the same learning rate, so the ratio
    does not shrink as the schedule decays the learning rate, nor with a period cut short); without such modules,
    divided by the period's step count. Observations are smoothed per layer (exponential moving average,
    `smoothing` = weight of the newest); a layer never observed gets the mean of the others. The result is mixed
    with uniform weights: weight_i = floor / n + (1 - floor) * estimate_i / sum(estimates), so every layer keeps at
    least `floor` times its uniform share. Summing floats in period order makes the result identical on every rank
    and after a resume (the log is in the checkpoint).
    """
    _check_mixing(floor, smoothing)

    def observations():
        for e in _entries_before(period_log, period, "layer_update_norms"):
            modules = sum((e.get("module_update_norms") or {}).values())
            scale = modules if modules > 0 else e["last_step"] - e["first_step"] + 1
            for layer, norm in zip(e["layers"], e["layer_update_norms"]):
                yield layer, norm / scale

    return _smoothed(observations(), n_layers, smoothing, floor)


def module_importance(period_log: Sequence[dict], index: dict[str, int], period: int, *, floor: float = AUTO_FLOOR,
                      smoothing: float = AUTO_SMOOTHING) -> tuple[float, ...] | None:
    """MISA's importance of each module for `period` from the gradient norms logged in periods <= period - 2 (None:
    none yet, sample by size alone).

    `index` maps module names to their positions. A module's observation in a period is its root-mean-square
    gradient norm over the period's steps divided by that of the always-trainable modules (`always_grad_norm`; they
    train in every period, so the ratio does not drift as the loss falls), or by 1 without them. Smoothing, the
    value for modules never trained yet (the mean of the others) and the floor are `auto_layer_weights`'s, so no
    module starves.
    """
    _check_mixing(floor, smoothing)

    def observations():
        for e in _entries_before(period_log, period, "module_grad_norms"):
            scale = e.get("always_grad_norm") or 1.0
            for name, norm in zip(e["modules"], e["module_grad_norms"]):
                yield index[name], norm / scale

    return _smoothed(observations(), len(index), smoothing, floor)


def outlier_layer_weights(layers, floor: float = OUTLIER_FLOOR) -> tuple[float, ...] | None:
    """OWS layer weights: `layers.outlier_ratios` mixed with uniform (`floor`); None when no layer has an outlier
    (the sampling stays uniform)."""
    ratios = outlier_ratios(layers)
    return _mixed_with_uniform(ratios, floor) if sum(ratios) > 0 else None


def _number_list(doc, where: str) -> list[float]:
    if not isinstance(doc, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in doc):
        raise ValueError(f"{where}: expected a JSON list of numbers (or {{\"layer_weights\": [...]}})")
    return [float(w) for w in doc]


def parse_layer_weights(value: str) -> list[float] | str:
    """``--lisa_layer_weights``: "auto", "outlier", "1,2,1,...", a JSON list "[1, 2, 1, ...]", a JSON file (a list, or
    {"layer_weights": [...]}) or a JSONL run log.

    From a run log the weight of a layer is its mean weight-update norm over the periods it trained in; layers
    never sampled there get the mean of the others, so they can still be chosen.
    """
    if value.strip() in LAYER_WEIGHT_RULES:
        return value.strip()
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".jsonl":
            return _weights_from_log(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if isinstance(doc, dict):
            doc = doc.get("layer_weights", doc.get("weights"))
        return _number_list(doc, str(path))
    if value.lstrip().startswith("["):
        try:
            return _number_list(json.loads(value), repr(value))
        except json.JSONDecodeError as e:
            raise ValueError(f"{value!r}: invalid JSON list at column {e.colno}: {e.msg}") from None
    if any(ch in value for ch in "/\\") or value.endswith((".json", ".jsonl")):
        raise ValueError(f"{value}: no such file")
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"{value!r}: expected comma-separated numbers or a file path") from None


def _weights_from_log(path: Path) -> list[float]:
    records = read_log(path)
    n_layers = next((r.get("n_layers") for r in records if r["kind"] == "config"), None)
    sums, counts = {}, {}
    for r in records:
        if r["kind"] != "period":
            continue
        for layer, norm in zip(r.get("layers", ()), r.get("layer_update_norms") or ()):
            sums[layer] = sums.get(layer, 0.0) + norm
            counts[layer] = counts.get(layer, 0) + 1
    if not n_layers or not sums:
        raise ValueError(f"{path}: no LISA periods with update norms in this log")
    means = {i: sums[i] / counts[i] for i in sums}
    fill = sum(means.values()) / len(means)
    return [means.get(i, fill) for i in range(n_layers)]

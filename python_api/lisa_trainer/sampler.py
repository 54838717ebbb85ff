"""Which decoder layers train in which LISA period: a pure function of (seed, period).

Every rank of a distributed run, a resumed run and the prefetcher (which must know period p+1 during period p)
ask the same question and must get the same answer without sharing any state, so nothing here touches a global
RNG or keeps a stream position. Each (seed, period, layer) triple is hashed with BLAKE2b into a uniform number;
the answer depends only on those bytes, not on the torch or Python version.

Sampling without replacement uses exponential keys (Efraimidis & Spirakis 2006): layer i gets
key_i = -ln(u_i) / w_i and the `n_active` smallest keys win. That is exactly sequential weighted sampling
without replacement (draw one layer with probability proportional to w, remove it, repeat); with equal weights
it is a uniform random subset, the paper's rule. A zero weight gives an infinite key: never chosen.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

__all__ = ["LayerSampler"]

_TWO_POW_53 = float(1 << 53)


def _uniform(seed: int, period: int, layer: int) -> float:
    """A uniform number in (0, 1) determined by (seed, period, layer) alone."""
    digest = hashlib.blake2b(f"lisa:{seed}:{period}:{layer}".encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "little") >> 11) + 0.5) / _TWO_POW_53  # 53 random bits, never 0 or 1


class LayerSampler:
    """Choose `n_active` of `n_layers` decoder layers for each period, uniformly or by importance weights.

    >>> s = LayerSampler(n_layers=8, n_active=2, seed=0)
    >>> s.layers_for_period(0) == s.layers_for_period(0)
    True
    """

    def __init__(self, n_layers: int, n_active: int, seed: int, weights: Sequence[float] | None = None):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        if isinstance(n_active, bool) or not isinstance(n_active, int) or not 1 <= n_active <= n_layers:
            raise ValueError(f"n_active must be an int in [1, n_layers={n_layers}], got {n_active!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.n_layers = n_layers
        self.n_active = n_active
        self.seed = seed
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

    def layers_for_period(self, period: int) -> tuple[int, ...]:
        """The sorted layer indices active in `period` (0-based)."""
        if isinstance(period, bool) or not isinstance(period, int) or period < 0:
            raise ValueError(f"period must be a non-negative int, got {period!r}")
        if self.n_active == self.n_layers:
            return tuple(range(self.n_layers))
        keys = []
        for i in range(self.n_layers):
            w = 1.0 if self.weights is None else self.weights[i]
            key = math.inf if w == 0 else -math.log(_uniform(self.seed, period, i)) / w
            keys.append((key, i))
        keys.sort()
        return tuple(sorted(i for _, i in keys[: self.n_active]))

    def inclusion_probabilities(self, n_periods: int = 10_000) -> list[float]:
        """Empirical fraction of the first `n_periods` periods in which each layer is active (for diagnostics)."""
        counts = [0] * self.n_layers
        for p in range(n_periods):
            for i in self.layers_for_period(p):
                counts[i] += 1
        return [c / n_periods for c in counts]

    def __repr__(self) -> str:
        w = "" if self.weights is None else f", weights={list(self.weights)}"
        return f"LayerSampler(n_layers={self.n_layers}, n_active={self.n_active}, seed={self.seed}{w})"

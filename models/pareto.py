"""Several objectives at once: Pareto layers, hypervolume, and a batch acquisition (ParEGO).

Every function here works in *minimization space*: each objective column already turned so
that lower is better (a maximized objective negated, see :func:`to_min`). Shapes: ``Z`` is
``n x m`` (``n`` compounds, ``m`` objectives), float64.

The acquisition is ParEGO (Knowles 2006): each pick draws random weights on the simplex and
ranks the pool by the augmented Chebyshev scalarization of the predicted objectives, made
optimistic by ``beta`` predicted standard deviations, times the probability that the compound
meets every constraint. Picks of one batch use fresh weights each, so a batch spreads along the
front; with ``diversity`` a candidate's score is also cut by its Tanimoto similarity to the
picks already made (pending compounds are never picked twice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Constraint", "hypervolume", "nondominated_layers", "parego_batch", "prob_feasible", "to_min"]


def to_min(Y: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """``n x m`` objectives -> minimization space (maximized columns negated)."""
    sign = np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)
    return np.asarray(Y, dtype=np.float64) * sign


def nondominated_layers(Z: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: layer 0 is the Pareto front, layer 1 the front of the rest, ...

    Returns:
        length-``n`` int array of layer indices.
    """
    n = Z.shape[0]
    layer = np.full(n, -1, dtype=np.int64)
    left = np.arange(n)
    k = 0
    while left.size:
        P = Z[left]
        # a dominates b: a <= b everywhere and a < b somewhere
        le = (P[:, None, :] <= P[None, :, :]).all(axis=2)
        lt = (P[:, None, :] < P[None, :, :]).any(axis=2)
        dominated = (le & lt).any(axis=0)
        front = left[~dominated]
        layer[front] = k
        left = left[dominated]
        k += 1
    return layer


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of points (all strictly below ``ref``) by slicing the last objective."""
    m = points.shape[1]
    if points.shape[0] == 0:
        return 0.0
    if m == 1:
        return float(ref[0] - points[:, 0].min())
    if m == 2:
        p = points[np.argsort(points[:, 0])]
        best = np.minimum.accumulate(p[:, 1])
        xs = np.append(p[1:, 0], ref[0])
        return float(np.sum((xs - p[:, 0]) * (ref[1] - best)))
    order = np.argsort(points[:, -1])
    p = points[order]
    total = 0.0
    for i in range(p.shape[0]):
        top = p[i + 1, -1] if i + 1 < p.shape[0] else ref[-1]
        if top > p[i, -1]:
            total += _hv(p[: i + 1, :-1], ref[:-1]) * (top - p[i, -1])
    return total


def hypervolume(Z: np.ndarray, ref: np.ndarray) -> float:
    """The volume dominated by the rows of ``Z`` and bounded by ``ref`` (minimization space);
    rows not strictly better than ``ref`` in every objective add nothing. Exact; the work grows
    with the size of the front (fine for fronts of hundreds in up to 4 objectives)."""
    Z = np.asarray(Z, dtype=np.float64)
    inside = Z[(Z < ref).all(axis=1)] if Z.size else Z.reshape(0, len(ref))
    if inside.shape[0] == 0:
        return 0.0
    front = inside[nondominated_layers(inside) == 0]
    return _hv(np.unique(front, axis=0), np.asarray(ref, dtype=np.float64))


@dataclass(frozen=True)
class Constraint:
    """``column <= bound`` (``upper=True``) or ``column >= bound``."""

    column: str
    bound: float
    upper: bool = True

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``"COL<=X"`` or ``"COL>=X"``.

        Raises:
            ValueError: neither operator, or a bound that is not a finite number.
        """
        for op, upper in (("<=", True), (">=", False)):
            if op in text:
                col, _, bound = text.partition(op)
                value = float(bound)
                if not math.isfinite(value) or not col.strip():
                    raise ValueError(f"constraint {text!r}: needs a column and a finite bound")
                return cls(col.strip(), value, upper)
        raise ValueError(f"constraint {text!r}: expected COL<=X or COL>=X")

    def met(self, values: np.ndarray) -> np.ndarray:
        return values <= self.bound if self.upper else values >= self.bound


def prob_feasible(means: np.ndarray, stds: np.ndarray, constraints: Sequence[Constraint]) -> np.ndarray:
    """Probability that each compound meets every constraint, under independent Gaussian predictions.

    Args:
        means, stds: ``n x c`` predictions of the constraint columns, in ``constraints`` order.
    Returns:
        length-``n`` probabilities.
    """
    if not constraints:
        return np.ones(means.shape[0])
    z = np.empty_like(means)
    for j, c in enumerate(constraints):
        s = np.maximum(stds[:, j], 1e-9)
        z[:, j] = (c.bound - means[:, j]) / s if c.upper else (means[:, j] - c.bound) / s
    from torch import special, tensor  # the Gaussian CDF, vectorized (torch is already a dependency)

    return np.prod(special.ndtr(tensor(z)).numpy(), axis=1)


def parego_batch(mean: np.ndarray, std: np.ndarray, candidates: np.ndarray, k: int, rng: np.random.Generator,
                 feasible: np.ndarray | None = None, beta: float = 1.0, rho: float = 0.05,
                 features: np.ndarray | None = None, diversity: float = 0.0, weights: np.ndarray | None = None,
                 scores: list[float] | None = None) -> np.ndarray:
    """Pick ``k`` of ``candidates`` (pool indices) by ParEGO.

    Args:
        mean, std: ``N x m`` predictions in minimization space for the whole pool.
        candidates: indices of the compounds that may be picked (unmeasured, not pending).
        feasible: length-``N`` probability of meeting the constraints (None = all 1).
        beta: optimism: objectives scored at ``mean - beta * std``.
        rho: weight of the augmentation term (keeps weakly dominated points from tying).
        features: ``N x d`` fingerprints (counts or bits) for the diversity term.
        diversity: in [0, 1]: a candidate's score is multiplied by ``1 - diversity * T`` for its
            Tanimoto similarity ``T`` to each earlier pick of the batch (0 = no diversity term).
        weights: length-``m`` relative importance of the objectives: each pick's weights are drawn
            from a Dirichlet with these concentrations (None = all 1, uniform on the simplex).
        scores: when given, each pick's score (in ``[0, 1 + rho]``) is appended to it.
    Returns:
        up to ``k`` pool indices, in pick order.
    """
    if candidates.size == 0 or k <= 0:
        return np.zeros(0, dtype=np.int64)
    opt = mean[candidates] - beta * std[candidates]
    lo, hi = opt.min(axis=0), opt.max(axis=0)
    norm = (opt - lo) / np.where(hi > lo, hi - lo, 1.0)  # 0 = the best predicted, per objective
    pof = np.ones(candidates.size) if feasible is None else feasible[candidates]
    m = mean.shape[1]
    taken = np.zeros(candidates.size, dtype=bool)
    penalty = np.ones(candidates.size)
    picks: list[int] = []
    alpha = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    for _ in range(min(k, candidates.size)):
        w = rng.dirichlet(alpha)
        cheb = (norm * w).max(axis=1) + rho * (norm * w).sum(axis=1)
        score = (1.0 + rho - cheb) * pof * penalty  # higher is better; in [0, 1 + rho]
        score[taken] = -np.inf
        j = int(np.argmax(score))
        taken[j] = True
        picks.append(int(candidates[j]))
        if scores is not None:
            scores.append(float(score[j]))
        if diversity > 0 and features is not None:
            F, f = features[candidates], features[candidates[j]]
            inter, union = np.minimum(F, f).sum(axis=1), np.maximum(F, f).sum(axis=1)
            penalty *= 1.0 - diversity * np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return np.asarray(picks, dtype=np.int64)

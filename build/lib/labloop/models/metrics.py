"""MolPAL's measures of how much of the top-k a campaign found.

Definitions follow MolPAL's ``scripts/trajectories.py``: values are compared in
the objective's own units and direction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["TopK", "calibration", "topk_measures"]


class TopK:
    """The true top-``k`` of a fully scored pool.

    Args:
        values: objective per scored compound (NaN = unscored, ignored).
        k: how many of the best count.
        minimize: True when lower values are better (docking scores).
        keys: optional identifier per value (for ``pct_topk_smiles_found``); the
            true top-k keys are the first ``k`` after a stable sort.
    """

    def __init__(self, values: ArrayLike, k: int, minimize: bool, keys: Sequence[str] | None = None) -> None:
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        self.k, self.minimize = k, minimize
        sign = 1.0 if minimize else -1.0
        order = np.flatnonzero(ok)[np.argsort(sign * v[ok], kind="stable")]
        self.values = v[order[:k]]
        self.keys = {keys[i] for i in order[:k]} if keys is not None else set()

    def best(self, found: np.ndarray) -> np.ndarray:
        found = np.asarray(found, dtype=np.float64)
        found = found[np.isfinite(found)]
        return np.sort(found)[: self.k] if self.minimize else -np.sort(-found)[: self.k]


def topk_measures(top: TopK, found_values: ArrayLike, found_keys: Sequence[str] | None = None) -> dict[str, float]:
    """The three MolPAL measures for the compounds acquired so far.

    Returns:
        ``pct_topk_scores_found`` (multiset overlap of top-k score values, %, tie-aware),
        ``pct_topk_smiles_found`` (% of the true top-k keys acquired; NaN without keys),
        ``topk_avg_pct_of_true`` (mean of the best k found / mean of the true top k, %).

    >>> t = TopK([-3.0, -2.0, -1.0, -1.0], k=2, minimize=True)
    >>> topk_measures(t, [-3.0, -1.0])["pct_topk_scores_found"]
    50.0
    """
    best = top.best(np.asarray(found_values, dtype=np.float64))
    overlap = sum((Counter(np.round(top.values, 6).tolist()) & Counter(np.round(best, 6).tolist())).values())
    smiles = float("nan")
    if found_keys is not None and top.keys:
        smiles = 100.0 * len(top.keys & set(found_keys)) / top.k
    avg = 100.0 * float(best.mean() / top.values.mean()) if best.size and top.values.mean() != 0 else 0.0
    if best.size < top.k and best.size:
        avg = 100.0 * float(best.sum() / top.k / top.values.mean())
    return {"pct_topk_scores_found": 100.0 * overlap / top.k, "pct_topk_smiles_found": smiles, "topk_avg_pct_of_true": avg}


def calibration(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """How honest the predicted std was on a batch before it was measured.

    Returns:
        ``nll``: mean Gaussian negative log likelihood (nats);
        ``miscal_area``: area between the observed and expected coverage of
        central intervals (0 = calibrated, 0.5 = worst).
    """
    from math import erf, sqrt

    y, mean, std = (np.asarray(a, dtype=np.float64) for a in (y, mean, std))
    ok = np.isfinite(y) & np.isfinite(mean) & np.isfinite(std)  # no prediction (random start): not rated
    y, mean, std = y[ok], mean[ok], std[ok]
    if y.size == 0:
        return {"nll": float("nan"), "miscal_area": float("nan")}
    s = np.clip(std, 1e-6, None)
    nll = float(np.mean(0.5 * np.log(2 * np.pi * s * s) + 0.5 * ((y - mean) / s) ** 2))
    z = np.abs(y - mean) / s
    ps = np.linspace(0.01, 0.99, 99)
    erf_v = np.vectorize(erf)
    observed = np.array([np.mean(erf_v(z / sqrt(2)) <= p) for p in ps])
    return {"nll": nll, "miscal_area": float(np.mean(np.abs(observed - ps)))}

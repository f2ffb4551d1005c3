"""Prospective model quality: how well the model predicted readings before it saw them.

Each reading of the objective is scored by the model version in force when it arrived, against
that version's prediction for the compound (mean and standard deviation, objective units). The
window of the last ``window`` such pairs gives the live figures a chemist reads next to the
requests: RMSE, mean Gaussian negative log-likelihood, the share inside the central 90% interval
(0.9 for a calibrated model) and the Spearman rank correlation.

>>> s = LiveScore(window=4)
>>> s.add(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.5, 2.0]), version=1)
>>> round(s.summary()["rmse"], 3), s.summary()["n"]
(0.645, 3)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LiveScore"]

_Z90 = 1.6448536269514722  # the central 90% interval of a Gaussian is mean ± 1.645 sd
_MIN_STD = 1e-9


class LiveScore:
    """A rolling window of prospective ``(mean, std, measured, version)`` quadruples.

    Args:
        window: how many of the latest scored readings the figures cover.
    """

    def __init__(self, window: int = 200) -> None:
        if window < 2:
            raise ValueError("window must be at least 2")
        self.window = window
        self.mean = np.zeros(0)
        self.std = np.zeros(0)
        self.y = np.zeros(0)
        self.version = np.zeros(0, dtype=np.int64)
        self.total = 0  # readings scored since the campaign began

    def add(self, mean: np.ndarray, std: np.ndarray, y: np.ndarray, version: int) -> None:
        """Score readings ``y`` (length ``n``) against predictions ``mean``, ``std`` (length ``n``,
        objective units) of model ``version``. Non-finite entries are skipped."""
        mean, std, y = (np.asarray(a, dtype=np.float64).ravel() for a in (mean, std, y))
        ok = np.isfinite(mean) & np.isfinite(std) & np.isfinite(y)
        if not ok.any():
            return
        k = self.window
        self.mean = np.concatenate([self.mean, mean[ok]])[-k:]
        self.std = np.concatenate([self.std, std[ok]])[-k:]
        self.y = np.concatenate([self.y, y[ok]])[-k:]
        self.version = np.concatenate([self.version, np.full(int(ok.sum()), version, dtype=np.int64)])[-k:]
        self.total += int(ok.sum())

    def summary(self) -> dict[str, Any]:
        """``n`` (scored readings in the window) and ``rmse``, ``nll``, ``coverage90``,
        ``spearman`` over them: None while fewer than 2 are scored (Spearman also when either side
        is constant)."""
        n = int(self.y.size)
        out: dict[str, Any] = {"n": n, "rmse": None, "nll": None, "coverage90": None, "spearman": None}
        if n < 2:
            return out
        err = self.y - self.mean
        sd = np.maximum(self.std, _MIN_STD)
        out["rmse"] = float(np.sqrt(np.mean(err**2)))
        out["nll"] = float(np.mean(0.5 * np.log(2 * math.pi * sd**2) + 0.5 * (err / sd) ** 2))
        out["coverage90"] = float(np.mean(np.abs(err) <= _Z90 * sd))
        out["spearman"] = _spearman(self.mean, self.y)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "mean": self.mean, "std": self.std, "y": self.y, "version": self.version,
                "total": self.total}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, window: int = 200) -> LiveScore:
        s = cls(int(state["window"]) if state else window)
        if state:
            s.mean, s.std, s.y = (np.asarray(state[k], dtype=np.float64) for k in ("mean", "std", "y"))
            s.version = np.asarray(state["version"], dtype=np.int64)
            s.total = int(state["total"])
        return s


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size)
    ranks[order] = np.arange(a.size, dtype=np.float64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return np.asarray(sums[inv] / counts[inv])


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ra, rb = _ranks(a), _ranks(b)
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return None
    return float(np.mean((ra - ra.mean()) * (rb - rb.mean())) / (sa * sb))

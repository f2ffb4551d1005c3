"""The online-learner contract, its one input check and its one outcome standardization.

Every learner treats the objective as *higher is better*; the campaign layer negates a
minimized objective before it gets here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labloop.models.errors import STABLE_ABS_MAX, InvalidTarget, ModelError

__all__ = ["STABLE_ABS_MAX", "OnlineLearner", "Standardizer", "check_targets", "default_device", "finite_prediction"]


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_targets(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one input check of every learner's ``update``: ``X`` as ``n x d`` float32, ``y`` as
    length-``n`` float64, finite and within ``STABLE_ABS_MAX``.

    Raises:
        ValueError: ``X`` and ``y`` differ in length.
        InvalidTarget: a target is non-finite or too large.
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    if y.size and not (np.all(np.isfinite(y)) and float(np.abs(y).max()) <= STABLE_ABS_MAX):
        bad = y[~(np.isfinite(y) & (np.abs(y) <= STABLE_ABS_MAX))]
        raise InvalidTarget(f"y must be finite (no NaN or infinity) and within +-{STABLE_ABS_MAX:g}; "
                            f"{bad.size} value(s) are not, the first {bad[0]}")
    return X, y


def finite_prediction(mean: np.ndarray, std: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    """A learner's prediction, never non-finite: a broken fit is a named error, not NaN scores.

    Raises:
        ModelError: a mean or std is NaN or infinite.
    """
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ModelError(f"{who} produced a non-finite prediction")
    return mean, std


@dataclass(frozen=True)
class Standardizer:
    """Outcome standardization: learners fit ``(y - mu) / sd`` and report ``m * sd + mu``, ``s * sd``.

    ``sd`` is the (weighted) population standard deviation, 1 when the targets are constant.

    >>> s = Standardizer.fit(np.array([1.0, 3.0]))
    >>> (s.mu, s.sd), s.transform(np.array([3.0])).tolist()
    ((2.0, 1.0), [1.0])
    """

    mu: float
    sd: float

    @classmethod
    def fit(cls, y: np.ndarray, weights: np.ndarray | None = None) -> Standardizer:
        """From targets ``y`` (length ``n``), each weighing ``weights`` (replicate counts) or 1."""
        mu = float(np.average(y, weights=weights))
        return cls(mu, float(np.sqrt(np.average((y - mu) ** 2, weights=weights))) or 1.0)

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (y - self.mu) / self.sd


class OnlineLearner(abc.ABC):
    """A regressor that learns from batches as they arrive.

    ``X`` is always an ``n x d`` float32 feature matrix, ``y`` a length-``n``
    float vector (higher is better); inputs are never mutated.
    """

    name: str = "learner"

    @abc.abstractmethod
    def update(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Learn from ``n`` new observations (``n >= 0``).

        ``keys`` (length ``n``, integers) name the compounds: an observation of a key seen
        before is a replicate of it. Without keys every row is a new compound.

        Raises:
            InvalidTarget: a target is non-finite or beyond ``STABLE_ABS_MAX`` (nothing is learned).
        """

    def update_from_pool(self, X_pool: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        """:meth:`update` with the observations of pool rows ``keys`` (``n`` positions into the
        ``N x d`` pool ``X_pool``). A learner that keeps its own copy of the pool overrides this
        to skip gathering rows it already has."""
        self.reserve(X_pool.shape[0])
        self.update(X_pool[keys], y, keys)

    def reserve(self, compounds: int) -> None:
        """A hint: up to ``compounds`` distinct compounds may come (a pool's size), so storage
        can be set aside once instead of grown, and copied, as they arrive. Default: nothing."""
        del compounds

    @abc.abstractmethod
    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predict ``m`` rows.

        Returns:
            ``(mean, std)``, two length-``m`` float64 arrays, finite, ``std >= 0``.

        Raises:
            NotFitted: the learner has seen no data.
        """

    @property
    @abc.abstractmethod
    def n_seen(self) -> int:
        """How many observations the learner has learned from."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the learner, as arrays and plain values
        (:mod:`labloop.models.state` stores it without pickle)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

"""A campaign's further assays: one online learner each over the campaign's pool.

A multi-objective campaign learns its first objective with :class:`~labloop.models.loop.PoolState`
(its pool, statuses and policy) and every other objective or constraint with a
:class:`SideModel` over the same pool rows. A compound with some assays unmeasured is the normal
case: each model learns from the readings of its own assay only, as they arrive.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labloop.models.learners import OnlineLearner, make_learner

__all__ = ["SideModel"]


class SideModel:
    """One assay's values over a pool (NaN = not measured), its learner and latest prediction.

    Args:
        learner: a name from :mod:`labloop.models.learners`.
        size: pool rows at creation (rows are appended with :meth:`grow`).
        device: torch device (None = CUDA when present).
    """

    def __init__(self, learner: str, size: int = 0, device: str | None = None) -> None:
        self.learner_name = learner
        self.learner: OnlineLearner = make_learner(learner, device=device)
        self.values = np.full(size, np.nan)
        self.pred: tuple[np.ndarray, np.ndarray] | None = None  # over the pool, in the assay's units
        self._new: list[int] = []

    def grow(self, size: int) -> None:
        """The pool now holds ``size`` rows."""
        if size > self.values.shape[0]:
            self.values = np.concatenate([self.values, np.full(size - self.values.shape[0], np.nan)])

    @property
    def unlearned(self) -> int:
        return len(self._new)

    def observe(self, index: np.ndarray, values: np.ndarray) -> None:
        """Readings of pool rows ``index`` (a later reading of a row replaces the earlier one)."""
        self.values[index] = values
        self._new.extend(np.asarray(index, dtype=np.int64).tolist())

    def take_new(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The unseen observations ``(y, keys)`` for :meth:`fit`, or None."""
        if not self._new:
            return None
        keys = np.array(sorted(set(self._new)), dtype=np.int64)
        self._new = []
        return self.values[keys].copy(), keys

    def fit(self, y: np.ndarray, keys: np.ndarray, X_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Learn ``(y, keys)`` and score ``X_pool``: ``(mean, std)`` per row (off the event loop)."""
        self.learner.update_from_pool(X_pool, y, keys)
        m, s = self.learner.predict(X_pool)
        return np.asarray(m, dtype=np.float64), np.asarray(s, dtype=np.float64)

    def prediction(self, X_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mean, std)`` over ``X_pool`` (rescored when the pool grew), or None before any reading."""
        if self.learner.n_seen == 0:
            return None
        if self.pred is None or self.pred[0].shape[0] != X_pool.shape[0]:
            m, s = self.learner.predict(X_pool)
            self.pred = (np.asarray(m, dtype=np.float64), np.asarray(s, dtype=np.float64))
        return self.pred

    def state_dict(self) -> dict[str, Any]:
        """The values and what is not learned yet; the learner is refitted from them on restore."""
        return {"learner": self.learner_name, "values": self.values.copy(), "new": np.asarray(self._new, dtype=np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, Any], X_pool: np.ndarray, device: str | None = None) -> SideModel:
        """Rebuild from :meth:`state_dict`: the learner refits every value it had learned.

        Raises:
            ValueError: values of another length than the pool's.
        """
        m = cls(str(state["learner"]), 0, device)
        m.values = np.asarray(state["values"], dtype=np.float64)
        if m.values.shape != (X_pool.shape[0],):
            raise ValueError(f"side model of {m.values.shape} values for a pool of {X_pool.shape[0]} rows")
        new = set(np.asarray(state["new"], dtype=np.int64).tolist())
        learned = np.array([i for i in np.flatnonzero(np.isfinite(m.values)).tolist() if i not in new], dtype=np.int64)
        if learned.size:
            m.learner.update_from_pool(X_pool, m.values[learned], learned)
        m._new = sorted(new)
        return m

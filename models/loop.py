"""Campaign state as pure compute: the pool, what is measured, pending or failed,
the learner and the policy. The Faust agents and ``labloop bench al`` both drive
this class, so the stream and the benchmark run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from labloop.models.acquisition import Policy, RandomPolicy, make_policy
from labloop.models.learners import OnlineLearner, RowPacker, make_learner, unpack_rows

__all__ = ["AVAILABLE", "FAILED", "MEASURED", "PENDING", "Proposal", "PoolState", "round_targets"]

AVAILABLE, PENDING, MEASURED, FAILED = 0, 1, 2, 3


@dataclass(frozen=True)
class Proposal:
    """A batch chosen by :meth:`PoolState.propose`.

    Attributes:
        index: ``k`` pool positions, best first.
        mean, std: the model's prediction for them, in the objective's units
            (NaN before the model has seen data).
        score: the policy's acquisition value (NaN for the random start).
        model_version: number of model updates behind the prediction.
    """

    index: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    score: np.ndarray
    model_version: int


def round_targets(pool_size: int, init_frac: float, batch_frac: float, rounds: int) -> list[int]:
    """Cumulative acquisition targets of MolPAL's round protocol.

    >>> round_targets(10560, 0.01, 0.01, 5)
    [105, 211, 316, 422, 528, 633]
    """
    out = []
    for r in range(rounds + 1):
        frac = init_frac + r * batch_frac
        out.append(int(np.floor(frac * pool_size + 1e-9)))
    return out


class PoolState:
    """One campaign's candidate pool and model.

    Args:
        X: ``n x d`` float32 features of the pool (rows may be appended later).
        maximize: direction of the objective.
        learner, policy: names from :mod:`labloop.models.learners` / :mod:`labloop.models.acquisition`.
        seed: seeds the random start and the policy.
        device: torch device for the learner (None = CUDA when present).
    """

    def __init__(self, X: np.ndarray, maximize: bool, learner: str = "gp", policy: str = "ucb",
                 seed: int = 0, device: str | None = None) -> None:
        self.X = np.asarray(X, dtype=np.float32)
        self.status = np.zeros(self.X.shape[0], dtype=np.int8)
        self.values = np.full(self.X.shape[0], np.nan)
        self.sign = 1.0 if maximize else -1.0
        self.learner: OnlineLearner = make_learner(learner, device=device)
        self.seed = seed
        self.policy: Policy = make_policy(policy, seed=seed)
        self._random = RandomPolicy(seed=seed)
        self._new: list[int] = []
        self.model_version = 0
        self._pred: tuple[np.ndarray, np.ndarray] | None = None
        self._packer = RowPacker()

    @property
    def size(self) -> int:
        return int(self.X.shape[0])

    def state_dict(self, learner: bool = True) -> dict[str, Any]:
        """Everything but caches, as arrays and JSON values (see :mod:`labloop.models.state`): the
        fingerprints sparse (rows packed once), statuses and values copied, the policies' random
        streams. ``learner=False`` leaves the learner's state out, for a caller that gets it
        elsewhere (from the model process): :meth:`from_state` then needs it given."""
        out: dict[str, Any] = {
            "X": self._packer.pack(self.X, self.X), "status": self.status.copy(), "values": self.values.copy(),
            "maximize": self.sign > 0, "seed": self.seed, "model_version": self.model_version,
            "new": np.asarray(self._new, dtype=np.int64), "policy": self.policy.name,
            "policy_state": self.policy.state_dict(), "random_state": self._random.state_dict(),
            "learner_name": self.learner.name}
        if learner:
            out["learner"] = self.learner.state_dict()
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | None = None,
                   learner: dict[str, Any] | None = None) -> PoolState:
        """Rebuild what :meth:`state_dict` described; ``learner``: the learner's state when it was
        stored apart. The learner is refitted from its stored data, not unpickled."""
        X = unpack_rows(state["X"])
        ps = cls(np.zeros((0, X.shape[1]), dtype=np.float32), maximize=bool(state["maximize"]),
                 learner=state["learner_name"], policy=state["policy"], seed=int(state["seed"]), device=device)
        ps.X = X
        ps.status = np.asarray(state["status"], dtype=np.int8)
        ps.values = np.asarray(state["values"], dtype=np.float64)
        if not ps.status.shape == ps.values.shape == (X.shape[0],):
            raise ValueError(f"pool state out of shape: {X.shape[0]} rows, {ps.status.shape} statuses")
        ps.model_version = int(state["model_version"])
        ps._new = [int(i) for i in np.asarray(state["new"]).tolist()]
        ps.policy.load_state_dict(state["policy_state"])
        ps._random.load_state_dict(state["random_state"])
        ls = learner if learner is not None else state.get("learner")
        if ls is None:
            raise ValueError("pool state without its learner's state")
        ps.learner.load_state_dict(ls)
        return ps

    def add(self, X: np.ndarray, packed: dict[str, Any] | None = None) -> np.ndarray:
        """Append candidates; returns their pool positions. ``packed``: the rows as
        :func:`~labloop.models.learners.pack_rows` gives them, when the caller has it (checkpoints reuse it)."""
        X = np.asarray(X, dtype=np.float32)
        start = self.size
        before = self.X
        self.X = X.copy() if start == 0 else np.concatenate([self.X, X])
        if packed is not None:
            self._packer.appended(before, self.X, packed)
        self.status = np.concatenate([self.status, np.zeros(X.shape[0], dtype=np.int8)])
        self.values = np.concatenate([self.values, np.full(X.shape[0], np.nan)])
        self._pred = None
        return np.arange(start, self.size)

    def set_policy(self, name: str) -> None:
        """Choose by another registered policy from now on (seeded like the first)."""
        self.policy = make_policy(name, seed=self.seed)

    def count(self, status: int) -> int:
        return int((self.status == status).sum())

    def mark_pending(self, index: np.ndarray) -> None:
        self.status[index] = PENDING

    def observe(self, index: np.ndarray, values: np.ndarray) -> None:
        """Record measured values (objective units). A measured compound stays measured."""
        index = np.asarray(index, dtype=np.int64)
        self.values[index] = values
        self.status[index] = MEASURED
        self._new.extend(index.tolist())

    def fail(self, index: np.ndarray) -> None:
        """A failed experiment: never requested again, never learned from."""
        self.status[np.asarray(index, dtype=np.int64)] = FAILED

    def release(self, index: np.ndarray) -> None:
        """Return pending candidates to the pool (an expired request, say)."""
        index = np.asarray(index, dtype=np.int64)
        self.status[index[self.status[index] == PENDING]] = AVAILABLE

    @property
    def has_new(self) -> bool:
        """Observations the learner has not seen yet."""
        return bool(self._new)

    @property
    def unlearned(self) -> int:
        """Measurements observed that no fit has taken yet."""
        return len(self._new)

    def take_new(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Hand over the unseen observations: ``(y_new, keys, X_pool)`` with ``y`` already oriented
        (higher is better), ``keys`` their pool positions and ``X_pool`` the pool as it is now
        (rows are only ever appended, by a new array). Together they are everything :meth:`fit`
        needs, so the fit, the gathering of rows included, runs on another thread while
        observations keep arriving."""
        if not self._new:
            return None
        idx = np.array(sorted(set(self._new)), dtype=np.int64)
        self._new = []
        return self.sign * self.values[idx], idx, self.X

    def fit(self, y_new: np.ndarray, keys: np.ndarray, X_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Update the learner with pool rows ``keys`` and score ``X_pool``: the heavy part, safe to
        run off the event loop while the pool's statuses change (only one fit at a time). Returns
        ``(mean, std)`` in objective units; :meth:`commit` installs them."""
        self.learner.update_from_pool(X_pool, y_new, keys)
        m, s = self.learner.predict(X_pool)
        return self.sign * m, s

    def commit(self, pred: tuple[np.ndarray, np.ndarray]) -> None:
        """Install a finished fit as the next model version."""
        self.model_version += 1
        self._pred = pred if pred[0].shape[0] == self.size else None  # the pool grew meanwhile: rescore lazily

    def current_prediction(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The model in force's ``(mean, std)`` over the pool (objective units), if it scored the
        whole pool as it is now; None before the first fit or after the pool grew (no rescoring
        here: this is called with readings arriving)."""
        if self.model_version == 0 or self._pred is None or self._pred[0].shape[0] != self.size:
            return None
        return self._pred

    def retrain(self) -> bool:
        """Feed the learner every observation it has not seen and score the pool; True if it learned."""
        work = self.take_new()
        if work is None:
            return False
        self.commit(self.fit(*work))
        return True

    def predict_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` over the whole pool in objective units (cached per model version)."""
        if self._pred is None or self._pred[0].shape[0] != self.size:
            m, s = self.learner.predict(self.X)
            self._pred = (self.sign * m, s)
        return self._pred

    def propose(self, k: int) -> Proposal:
        """Choose up to ``k`` available candidates and mark them pending.

        Before the learner has seen data the choice is uniform at random.
        """
        blocked = self.status != AVAILABLE
        n = self.size
        if self.learner.n_seen == 0:
            idx = self._random.select(np.zeros(n), np.zeros(n), blocked, k)
            nan = np.full(idx.shape[0], np.nan)
            prop = Proposal(idx, nan, nan, nan, self.model_version)
        else:
            mean, std = self.predict_pool()
            idx, score = self.policy.select_scored(self.sign * mean, std, blocked, k)
            prop = Proposal(idx, mean[idx], std[idx], self.sign * score, self.model_version)
        self.mark_pending(prop.index)
        return prop

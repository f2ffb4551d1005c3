"""The Tanimoto-kernel Gaussian process on count fingerprints: labloop's default learner.

It keeps the training set (one row per distinct compound, its target the mean of its
replicates) and fits it exactly (:mod:`labloop.models.gp_exact`) up to ``exact_max`` compounds,
with the Nyström/DTC approximation (:mod:`labloop.models.gp_nystrom`) beyond.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from labloop.models.base import OnlineLearner, check_targets, default_device, finite_prediction
from labloop.models.errors import NotFitted
from labloop.models.gp_exact import ExactFit, fit_exact
from labloop.models.gp_nystrom import Measurements, NystromDTC, NystromFit
from labloop.models.rows import RowPacker, unpack_rows

__all__ = ["TanimotoGP"]


class TanimotoGP(OnlineLearner):
    """Exact Gaussian process with a Tanimoto kernel on (count) fingerprints.

    ``update`` adds the new observations and refits the two hyper-parameters
    (signal variance and noise) by maximum marginal likelihood over a grid of
    noise ratios, using one eigendecomposition of the Tanimoto Gram matrix. A row
    seen before (the same compound measured again) is a replicate: its target
    becomes the mean of its measurements, so ``n`` counts distinct compounds.
    Cost: ``O(n^3)`` per update, ``O(n m nnz)`` per prediction of ``m`` rows.

    Past ``exact_max`` compounds (a long or replayed campaign) it switches to a
    Nyström approximation on ``landmarks`` training compounds (a deterministic
    random subset, re-drawn when ``n`` has grown fourfold): a deterministic
    training conditional (DTC) GP. Its sufficient statistics (the landmark Gram
    ``sum phi phi^T`` and ``sum phi y`` over measurements) are accumulated as data
    arrive, so an update costs ``O(n_new L^2 + L^3)`` however long the campaign,
    and predictions ``O(m L^2)`` with the pool's landmark features cached between
    updates. Replicates weigh by their count. Beyond ``max_train`` compounds it
    keeps the best half and the most recent half (and re-accumulates).

    Args:
        device: ``"cpu"`` or ``"cuda"``; ``None`` picks CUDA when present.
        max_train: cap on the stored training set.
        exact_max: largest training set fitted exactly.
        landmarks: inducing compounds of the approximation.
        background_redraw: prepare re-drawn landmarks on a background thread (the model
            switches one update later, so results depend on timing); False = at once, reproducible.
    """

    name = "gp"
    _RATIOS = np.logspace(-3, 0.5, 24)

    def __init__(self, device: str | None = None, max_train: int = 50_000, exact_max: int = 700,
                 landmarks: int = 256, background_redraw: bool = True) -> None:
        self.device = torch.device(device or default_device())
        self.max_train = max_train
        self.exact_max = exact_max
        self.landmarks = landmarks
        self.background_redraw = background_redraw
        self.nystrom = NystromDTC(landmarks, self.device, background_redraw)
        self._X = np.zeros((0, 0), dtype=np.float32)  # a view of _buf: rows grow without copying each time
        self._buf = self._X
        self._packer = RowPacker()  # checkpoints pack only the rows added since the last one
        self._y = np.zeros(0, dtype=np.float64)  # per row: the mean of its measurements
        self._n = np.zeros(0, dtype=np.int64)  # measurements behind each row
        self._rows: dict[int, int] = {}  # compound key -> row
        self._seen = 0
        self._fit: ExactFit | NystromFit | None = None

    @property
    def n_seen(self) -> int:
        return self._seen

    def update(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> None:
        X, y = check_targets(X, y)
        if X.shape[0] == 0:
            return
        if self._X.size == 0:
            self._X = self._buf = np.zeros((0, X.shape[1]), dtype=np.float32)
        if keys is None:  # anonymous rows: each one a new compound
            keys = np.arange(self._seen, self._seen + y.shape[0]) + (1 << 62)
        pos = np.empty(y.shape[0], dtype=np.int64)
        fresh = []
        for j, k in enumerate(np.asarray(keys).tolist()):
            i = self._rows.get(k)
            if i is None:
                i = self._rows[k] = len(self._rows)
                fresh.append(j)
            pos[j] = i
        n_rows = len(self._rows)
        sums = np.zeros(n_rows)
        counts = np.zeros(n_rows, dtype=np.int64)
        sums[: self._y.shape[0]] = self._y * self._n
        counts[: self._n.shape[0]] = self._n
        np.add.at(sums, pos, y)
        np.add.at(counts, pos, 1)
        if fresh:
            self._append_rows(X[fresh])
        self._n, self._y = counts, sums / counts
        self._seen += int(y.shape[0])
        if self._y.shape[0] > self.max_train:
            half = self.max_train // 2
            recent = np.arange(self._y.shape[0] - half, self._y.shape[0])
            rest = np.arange(self._y.shape[0] - half)
            best = rest[np.argsort(-self._y[rest], kind="stable")[: self.max_train - half]]
            keep = np.sort(np.concatenate([best, recent]))
            self._X, self._y, self._n = self._X[keep], self._y[keep], self._n[keep]
            self._buf = self._X
            by_row = {i: k for k, i in self._rows.items()}
            self._rows = {by_row[int(old)]: new for new, old in enumerate(keep)}
            self.nystrom.forget_statistics()  # rows dropped: accumulate again
        # This update's measurements per compound (replicates summed).
        _, first, inv = np.unique(pos, return_index=True, return_inverse=True)
        self._refit(Measurements(X[first], np.bincount(inv).astype(np.float64), np.bincount(inv, weights=y)))

    def reserve(self, compounds: int) -> None:
        """Room for the training rows of up to ``compounds`` compounds (at most ``max_train``):
        the buffer is allocated, not touched, so memory is only used as rows arrive, and no
        later growth copies the rows (updates that grew it past 4,096 and 8,192 rows took 86 and 177 ms)."""
        cap, (n, d) = min(int(compounds), self.max_train), self._X.shape
        if cap > self._buf.shape[0] and d > 0:  # d is known once the first rows came
            buf = np.empty((cap, d), dtype=np.float32)
            buf[:n] = self._X
            self._buf, self._X = buf, buf[:n]

    def _append_rows(self, rows: np.ndarray) -> None:
        n, k = self._X.shape[0], rows.shape[0]
        if n + k > self._buf.shape[0]:
            buf = np.empty((max(2 * self._buf.shape[0], n + k, 64), rows.shape[1]), dtype=np.float32)
            buf[:n] = self._X
            self._buf = buf
        self._buf[n : n + k] = rows
        self._X = self._buf[: n + k]

    def _refit(self, new: Measurements | None = None, redraw: bool = True) -> None:
        """Fit on every stored row; ``new``: this update's measurements (None: from scratch);
        ``redraw``: whether the approximation may draw new landmarks now."""
        if self._y.shape[0] > self.exact_max:
            self._fit = self.nystrom.fit(self._X, self._y, self._n, new, self._RATIOS, redraw)
        else:
            self._fit = fit_exact(self._X, self._y, self.device, self._RATIOS)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self._fit
        if f is None:
            raise NotFitted("TanimotoGP.predict called before any update")
        if isinstance(f, NystromFit):
            out = self.nystrom.predict(f, np.asarray(X, dtype=np.float32) if X.dtype != np.float32 else X)
        else:
            out = f.predict(X, self.device)
        return finite_prediction(*out, "TanimotoGP")

    def state_dict(self) -> dict[str, Any]:
        keys = np.empty(len(self._rows), dtype=np.int64)
        for k, i in self._rows.items():
            keys[i] = k
        z = self.nystrom.landmarks
        # Training fingerprints travel sparse (~2 % of the bytes), packing only rows added since the last time.
        return {"name": self.name, "X": self._packer.pack(self._X, self._buf), "y": self._y.copy(), "n": self._n.copy(),
                "keys": keys, "seen": self._seen, "max_train": self.max_train, "exact_max": self.exact_max,
                "landmarks": self.landmarks, "background_redraw": self.background_redraw,
                "Z": None if z is None else z.Z, "z_at": 0 if z is None else z.at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Become the learner ``state`` describes: its training set is stored, the fit is done again."""
        self.max_train = int(state["max_train"])
        X = state["X"]
        self._X = self._buf = unpack_rows(X) if isinstance(X, dict) else np.asarray(X, dtype=np.float32)
        self._y = np.asarray(state["y"], dtype=np.float64)
        self._n = np.asarray(state["n"], dtype=np.int64)
        self._seen = int(state["seen"])
        self._rows = {int(k): i for i, k in enumerate(np.asarray(state["keys"]).tolist())}
        self.exact_max, self.landmarks = int(state["exact_max"]), int(state["landmarks"])
        self.background_redraw = bool(state.get("background_redraw", self.background_redraw))
        self.nystrom = NystromDTC(self.landmarks, self.device, self.background_redraw)
        if state["Z"] is not None:
            self.nystrom.set_landmarks(np.asarray(state["Z"], dtype=np.float32), int(state["z_at"]))
        self._fit = None
        if self._y.shape[0]:
            self._refit(redraw=False)  # the landmarks it had: the same model, not the one after its next update

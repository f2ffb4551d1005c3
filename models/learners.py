"""Online learners with uncertainty: one contract, ``update`` + ``predict``.

Every learner treats the objective as *higher is better*; the campaign layer
negates a minimized objective before it gets here.
"""

from __future__ import annotations

import abc
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from labloop.models.errors import InvalidTarget, ModelError, NotFitted, UnknownName

# torch flags CSR tensors as beta; labloop uses only CSR @ dense, which is stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

__all__ = ["DeepEnsemble", "OnlineLearner", "RowPacker", "TanimotoGP", "default_device", "make_learner", "pack_rows",
           "unpack_rows", "LEARNERS", "STABLE_ABS_MAX", "check_targets"]

# The largest |y| a learner takes. Outcomes are standardized in float64, so squares of such
# values stay far from overflow (a 1e308 reading made every later prediction NaN), and no
# assay in any unit comes near it.
STABLE_ABS_MAX = 1e12


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


def _finite(mean: np.ndarray, std: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    """A learner's prediction, never non-finite: a broken fit is a named error, not NaN scores."""
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ModelError(f"{who} produced a non-finite prediction")
    return mean, std


def pack_rows(X: np.ndarray) -> dict[str, Any]:
    """A sparse copy of an ``n x d`` fingerprint matrix for checkpoints (~2 % of the bytes)."""
    X = np.asarray(X, dtype=np.float32)
    r, c = np.nonzero(X)
    return {"shape": X.shape, "r": r.astype(np.int32), "c": c.astype(np.int32), "v": X[r, c]}


class RowPacker:
    """:func:`pack_rows` for a matrix that only grows: rows packed before are not scanned again.

    ``base`` is the array the rows live in (a growing buffer, or the matrix itself); another
    base, or fewer rows than packed, means the rows changed: pack them all again.
    """

    def __init__(self) -> None:
        self._base: Any = None
        self._packed: dict[str, Any] | None = None

    def pack(self, X: np.ndarray, base: np.ndarray) -> dict[str, Any]:
        p = self._packed
        if p is None or self._base is None or self._base() is not base or X.shape[0] < p["shape"][0]:
            p = pack_rows(X)
        elif X.shape[0] > p["shape"][0]:
            n = p["shape"][0]
            new = pack_rows(X[n:])
            p = {"shape": X.shape, "r": np.concatenate([p["r"], new["r"] + n]), "c": np.concatenate([p["c"], new["c"]]),
                 "v": np.concatenate([p["v"], new["v"]])}
        self._base, self._packed = weakref.ref(base), p
        return p

    def appended(self, before: np.ndarray, after: np.ndarray, rows: dict[str, Any]) -> None:
        """``after`` is ``before`` plus rows already packed as ``rows`` (packed off the caller's
        critical path): extend the pack without scanning ``after``; otherwise pack lazily later."""
        p, n = self._packed, before.shape[0]
        if n == 0:
            p = rows
        elif p is not None and self._base is not None and self._base() is before and p["shape"][0] == n:
            p = {"shape": after.shape, "r": np.concatenate([p["r"], rows["r"] + n]), "c": np.concatenate([p["c"], rows["c"]]),
                 "v": np.concatenate([p["v"], rows["v"]])}
        else:
            return
        self._base, self._packed = weakref.ref(after), {**p, "shape": after.shape}


def unpack_rows(p: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`pack_rows`: the dense float32 matrix."""
    X = np.zeros(p["shape"], dtype=np.float32)
    X[p["r"], p["c"]] = p["v"]
    return X


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
            ``(mean, std)``, two length-``m`` float64 arrays, ``std >= 0``.

        Raises:
            NotFitted: the learner has seen no data.
        """

    @property
    @abc.abstractmethod
    def n_seen(self) -> int:
        """How many observations the learner has learned from."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the learner (tensors on CPU)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _tanimoto(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Continuous Tanimoto similarity ``<a,b> / (|a|^2 + |b|^2 - <a,b>)``: ``n x m`` in [0, 1]."""
    dot = a @ b.T
    denom = a_sq[:, None] + b_sq[None, :] - dot
    return torch.where(denom > 0, dot / denom.clamp_min(1e-12), torch.ones_like(dot))


Rows = tuple[torch.Tensor, torch.Tensor]  # fingerprint rows ready for products: (CSR or dense float32, squared norms)


def _prepare_rows(X: np.ndarray, device: torch.device) -> Rows:
    """Fingerprint rows ``X`` (``m x d``) as an operand for :func:`_tanimoto_prepared`: sparse CSR on
    CPU, dense on CUDA, with their squared norms (float64; exact, the counts are small integers)."""
    X = np.asarray(X, dtype=np.float32)
    Xs = torch.from_numpy(X).to(device)
    if device.type == "cpu":
        return Xs.to_sparse_csr(), torch.from_numpy(np.einsum("ij,ij->i", X, X).astype(np.float64))
    return Xs, (Xs * Xs).sum(1).double()


def _tanimoto_prepared(rows: Rows, Tt32: torch.Tensor, t_sq: torch.Tensor) -> torch.Tensor:
    """Tanimoto similarity of prepared rows to the columns of ``Tt32`` (``d x n`` float32, squared norms ``t_sq``)."""
    Xs, sq = rows
    dot = (torch.sparse.mm(Xs, Tt32) if Xs.layout == torch.sparse_csr else Xs @ Tt32).double()
    denom = sq[:, None] + t_sq[None, :] - dot
    return torch.where(denom > 0, dot / denom.clamp_min(1e-12), torch.ones_like(dot))


def _tanimoto_rows(X: np.ndarray, Tt32: torch.Tensor, t_sq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Tanimoto similarity of fingerprint rows ``X`` (``m x d``) to the columns of ``Tt32``
    (``d x n``, float32) whose squared norms are ``t_sq``: ``m x n`` float64.

    Fingerprints are ~2% dense (49 of 2048 columns on Enamine 10k), so on CPU a sparse
    product is cheaper (measured: 0.11 s against 0.35 s dense float32 and 0.94 s float64 for
    10,560 x 1,000). Counts are small integers, so float32 dot products are exact while they
    stay below 2**24.
    """
    return _tanimoto_prepared(_prepare_rows(X, device), Tt32, t_sq)


_BACKGROUND: list[Any] = []


def _background() -> Any:
    """One thread shared by all learners for work off an update's critical path."""
    if not _BACKGROUND:
        from concurrent.futures import ThreadPoolExecutor

        _BACKGROUND.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-landmarks"))
    return _BACKGROUND[0]


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
        self._Z: np.ndarray | None = None  # landmark fingerprints
        self._z_at = 0  # n when the landmarks were drawn
        self._z_version = 0
        self.background_redraw = background_redraw
        self._redraw_job: tuple[Any, ...] | None = None  # landmarks being prepared in the background
        self._since_redraw: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # measurements since that began
        # DTC sufficient statistics over all measurements for the current landmarks: sum phi phi^T,
        # sum phi y, sum phi (None = accumulate again from the stored rows).
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._new: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # this update's measurements
        # pool rows (weakref), landmarks version, prepared rows, landmark features (float32), prior variance
        self._pool_cache: tuple[Any, int, list[Rows], torch.Tensor, torch.Tensor] | None = None
        self._X = np.zeros((0, 0), dtype=np.float32)  # a view of _buf: rows grow without copying each time
        self._buf = self._X
        self._packer = RowPacker()  # checkpoints pack only the rows added since the last one
        self._y = np.zeros(0, dtype=np.float64)
        self._n = np.zeros(0, dtype=np.int64)  # measurements behind each row
        self._rows: dict[int, int] = {}  # compound key -> row
        self._seen = 0
        self._fit: dict[str, Any] | None = None
        # The last incremental change of _stats: (stats before, stats after, phi of the new rows, counts).
        self._delta: tuple[Any, Any, torch.Tensor, np.ndarray] | None = None
        # The pool's posterior quadratic form phi^T (G + rI)^-1 phi for the stats, ratio and factor it
        # was computed with: (pool features, stats, ratio, Wv, q (m,), incremental steps since a full one).
        self._qcache: tuple[Any, Any, float, torch.Tensor, torch.Tensor, int] | None = None

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
            self._stats = self._redraw_job = None  # rows dropped: accumulate again
        # This update's measurements per compound (replicates summed): (rows, counts, sums of y).
        _, first, inv = np.unique(pos, return_index=True, return_inverse=True)
        self._new = (X[first], np.bincount(inv).astype(np.float64), np.bincount(inv, weights=y))
        try:
            self._refit()
        finally:
            self._new = None

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

    def _refit(self) -> None:
        if self._y.shape[0] > self.exact_max:
            self._refit_nystrom()
        else:
            self._refit_exact()

    # ---- Nyström (DTC) path -------------------------------------------------------------
    def _landmark_features(self, X: np.ndarray | list[Rows], chunk: int = 4096,
                           zfit: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``phi(x) = L_Z^-1 k_Z(x)``: ``len(X) x L`` float64, so that ``phi(x).phi(x')`` approximates k.
        ``X`` is fingerprint rows, or the chunks :func:`_prepare_rows` made of them; ``zfit`` the
        landmarks (default: the current ones)."""
        f = zfit if zfit is not None else self._zfit
        parts = X if isinstance(X, list) else [_prepare_rows(X[s : s + chunk], self.device)
                                               for s in range(0, X.shape[0], chunk)]
        out = []
        for rows in parts:
            K = _tanimoto_prepared(rows, f["Zt32"], f["zsq"])
            out.append(torch.linalg.solve_triangular(f["Lz"], K.T, upper=False).T)
        return torch.cat(out) if out else torch.zeros((0, f["Lz"].shape[0]), dtype=torch.float64, device=self.device)

    def _pick_landmarks(self) -> np.ndarray:
        """A deterministic random subset of the training rows (seeded by their count)."""
        n = self._y.shape[0]
        pick = np.sort(np.random.default_rng(n).choice(n, size=min(self.landmarks, n), replace=False))
        return self._X[pick].copy()

    def _draw_landmarks(self) -> None:
        self._set_landmarks(self._pick_landmarks(), self._y.shape[0])

    def _zfit_of(self, Z: np.ndarray) -> dict[str, torch.Tensor]:
        Zt = torch.from_numpy(Z).to(self.device, torch.float64)
        zsq = (Zt * Zt).sum(1)
        Kzz = _tanimoto(Zt, Zt, zsq, zsq) + 1e-6 * torch.eye(Z.shape[0], dtype=torch.float64, device=self.device)
        return {"Lz": torch.linalg.cholesky(Kzz), "Zt32": Zt.float().T.contiguous(), "zsq": zsq}

    def _set_landmarks(self, Z: np.ndarray, z_at: int, zfit: dict[str, torch.Tensor] | None = None) -> None:
        self._Z, self._z_at = Z, z_at
        self._z_version += 1
        self._zfit = zfit if zfit is not None else self._zfit_of(Z)
        self._stats = None

    def _redraw_landmarks(self) -> bool:
        """New landmarks for a grown training set, without stalling the updates that need the model now.

        A background thread computes, under the new landmarks, the pool's features and the
        training statistics of the rows as they were when it started; updates go on with the old
        landmarks meanwhile and remember their measurements. The first update after the thread
        finished switches, adding those measurements (``O(n_new L^2)``). Without a cached pool
        (nothing predicted yet) the switch is immediate. Returns True when the statistics are
        already complete for this update.
        """
        job = self._redraw_job
        if job is None:
            cache = self._pool_cache
            pool = cache[0]() if cache is not None else None
            n = self._y.shape[0]
            Z = self._pick_landmarks()
            zfit = self._zfit_of(Z)
            if not self.background_redraw or cache is None or pool is None:
                self._set_landmarks(Z, n, zfit)
                return False
            prepared = cache[2]
            X, c, ysum = self._X, self._n.astype(np.float64), self._y * self._n  # rows only grow: a view is stable

            def work() -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
                Phi = self._landmark_features(X, 4096, zfit)
                ct, yt = torch.from_numpy(c).to(self.device), torch.from_numpy(ysum).to(self.device)
                return ((Phi * ct[:, None]).T @ Phi, Phi.T @ yt, Phi.T @ ct), self._landmark_features(prepared, 4096, zfit)

            self._redraw_job = (Z, n, zfit, cache[0], prepared, _background().submit(work))
            self._since_redraw = []
            return False
        assert self._new is not None
        self._since_redraw.append(self._new)
        Z, z_at, zfit, pool_ref, prepared, fut = job
        if not fut.done():
            return False
        self._redraw_job = None
        (G, b, s0), Phi = fut.result()
        self._set_landmarks(Z, z_at, zfit)
        stats = (G, b, s0)
        for new in self._since_redraw:  # measurements that arrived while the thread worked
            stats = self._add_measurements(stats, *new)
        self._since_redraw = []
        self._stats = stats
        if pool_ref() is not None:
            self._pool_cache = (pool_ref, self._z_version, prepared, Phi.float(), (1.0 - (Phi * Phi).sum(1)).clamp_min(0.0))
        return True

    def _gram_stats(self, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sum phi phi^T, sum phi y, sum phi)`` over every measurement, kept up to date
        (``complete``: they already hold this update's measurements)."""
        if complete and self._stats is not None:
            return self._stats
        if self._stats is None or self._new is None:  # from the stored rows: each row weighs by its count
            Phi = self._landmark_features(self._X)
            c = torch.from_numpy(self._n.astype(np.float64)).to(self.device)
            y = torch.from_numpy(self._y * self._n).to(self.device, torch.float64)
            self._stats = ((Phi * c[:, None]).T @ Phi, Phi.T @ y, Phi.T @ c)
        else:  # add this update's measurements only
            before = self._stats
            X, counts, ysum = self._new
            phi = self._landmark_features(X)
            self._stats = self._add_measurements(before, X, counts, ysum, phi)
            self._delta = (before, self._stats, phi, counts)
        return self._stats

    def _add_measurements(self, stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], X: np.ndarray,
                          counts: np.ndarray, ysum: np.ndarray, phi: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Statistics plus measurements of compounds ``X`` (one row each; ``counts`` and ``ysum``
        of their measurements): one feature row per compound, however many replicates.
        ``phi``: ``X``'s landmark features, when the caller has them."""
        phi = self._landmark_features(X) if phi is None else phi
        c = torch.from_numpy(counts).to(self.device)
        G, b, s0 = stats
        return G + (phi * c[:, None]).T @ phi, b + phi.T @ torch.from_numpy(ysum).to(self.device), s0 + phi.T @ c

    def _refit_nystrom(self) -> None:
        n = self._y.shape[0]
        if self._Z is None:
            self._draw_landmarks()
        elif not hasattr(self, "_zfit"):
            self._set_landmarks(self._Z, self._z_at)
        complete = False
        if n > 4 * self._z_at or self._redraw_job is not None:
            complete = self._redraw_landmarks()
        G, b, s0 = self._gram_stats(complete)
        w = self._n.astype(np.float64)
        mu = float(np.average(self._y, weights=w))
        sd = float(np.sqrt(np.average((self._y - mu) ** 2, weights=w))) or 1.0
        lam, V = torch.linalg.eigh(G)
        lam = lam.clamp_min(0.0)
        u = V.T @ ((b - mu * s0) / sd)  # V^T Phi^T C y_standardized
        yCy = float((w * ((self._y - mu) / sd) ** 2).sum())
        log_c = float(np.log(w).sum())
        best: tuple[float, float, float] | None = None
        for r in self._RATIOS:
            quad = (yCy - float((u * u / (lam + r)).sum())) / float(r)
            s2 = max(quad / n, 1e-12)
            nll = 0.5 * n * math.log(s2) + 0.5 * (n * math.log(float(r)) - log_c + float(torch.log1p(lam / float(r)).sum()))
            if best is None or nll < best[0]:
                best = (nll, float(r), s2)
        assert best is not None
        _, ratio, s2 = best
        self._fit = {"kind": "nystrom", "w": V @ (u / (lam + ratio)), "Wv": V * torch.rsqrt(lam + ratio)[None, :],
                     "s2": s2, "ratio": ratio, "mu": mu, "sd": sd, "z_version": self._z_version}

    def _predict_nystrom(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self._fit
        assert f is not None
        cache = self._pool_cache
        if cache is not None and cache[0]() is X and cache[1] == f["z_version"]:
            Phi32, prior = cache[3], cache[4]
        else:
            # The pool's sparse form outlives new landmarks: a redraw only redoes the products.
            prepared = cache[2] if cache is not None and cache[0]() is X else \
                [_prepare_rows(X[s : s + 4096], self.device) for s in range(0, X.shape[0], 4096)]
            Phi = self._landmark_features(prepared)
            Phi32, prior = Phi.float(), (1.0 - (Phi * Phi).sum(1)).clamp_min(0.0)
            try:
                self._pool_cache = (weakref.ref(X), f["z_version"], prepared, Phi32, prior)
            except TypeError:  # not weak-referenceable (a view): no caching
                self._pool_cache = None
        mean = (Phi32 @ f["w"].float()).double()
        var = prior + f["ratio"] * self._pool_quadratic(Phi32)
        return (mean * f["sd"] + f["mu"]).cpu().numpy(), (torch.sqrt(var * f["s2"]) * f["sd"]).cpu().numpy()

    _WOODBURY_STEPS = 32  # incremental variance updates between two full ones (float32 round-off)

    def _pool_quadratic(self, Phi32: torch.Tensor) -> torch.Tensor:
        """``q_i = phi_i^T (G + rI)^-1 phi_i`` over the pool's landmark features (``m x L``, float32).

        In full it is an ``m x L x L`` product, the bulk of a rescoring. When the only change since
        the last one is this update's measurements (``G`` plus ``U U^T``, ``U`` the ``k`` new rows'
        features weighted by their counts, same landmarks and ratio), the Woodbury identity gives
        ``q - ||Ls^-1 (A U)^T phi||^2`` with ``A = (G_old + rI)^-1`` and ``Ls Ls^T = I + U^T A U``:
        an ``m x L x k`` product. A full product every ``_WOODBURY_STEPS`` keeps round-off bounded.
        """
        f = self._fit
        assert f is not None and self._stats is not None
        qc, d, L = self._qcache, self._delta, Phi32.shape[1]
        q: torch.Tensor | None = None
        steps = 0
        if qc is not None and qc[0] is Phi32 and qc[2] == f["ratio"]:
            if qc[1] is self._stats:  # nothing learned since: the same form
                q, steps = qc[4], qc[5]
            elif d is not None and d[0] is qc[1] and d[1] is self._stats and d[2].shape[0] <= L // 2 \
                    and qc[5] < self._WOODBURY_STEPS:
                U = d[2].T * torch.from_numpy(np.sqrt(d[3])).to(self.device)[None, :]  # L x k
                AU = qc[3] @ (qc[3].T @ U)
                S = torch.eye(U.shape[1], dtype=torch.float64, device=self.device) + U.T @ AU
                B = torch.linalg.solve_triangular(torch.linalg.cholesky(S), AU.T, upper=False)  # k x L
                P = Phi32 @ B.T.float()
                q, steps = qc[4] - (P * P).sum(1).double(), qc[5] + 1
        if q is None:  # float32 for the m x L x L product; the sums stay float64
            proj = Phi32 @ f["Wv"].float()
            q = (proj * proj).sum(1).double()
        self._qcache = (Phi32, self._stats, f["ratio"], f["Wv"], q, steps)
        return q

    # ---- exact path ---------------------------------------------------------------------
    def _refit_exact(self) -> None:
        dev = self.device
        Xt = torch.from_numpy(self._X).to(dev, torch.float64)
        sq = (Xt * Xt).sum(1)
        K = _tanimoto(Xt, Xt, sq, sq)
        lam, Q = torch.linalg.eigh(K)
        lam = lam.clamp_min(0.0)
        mu = float(self._y.mean())
        sd = float(self._y.std()) or 1.0
        yt = torch.from_numpy((self._y - mu) / sd).to(dev, torch.float64)
        z = Q.T @ yt
        n = yt.shape[0]
        best: tuple[float, float, float] | None = None
        for r in self._RATIOS:
            denom = lam + float(r)
            s2 = float((z * z / denom).sum()) / n
            nll = 0.5 * n * math.log(max(s2, 1e-12)) + 0.5 * float(torch.log(denom).sum())
            if best is None or nll < best[0]:
                best = (nll, float(r), s2)
        assert best is not None
        _, ratio, s2 = best
        inv_diag = 1.0 / (lam + ratio)
        alpha = Q @ (inv_diag * z)
        # (K + rI)^-1 = Q diag(1/(lam+r)) Q^T; keep the factor W = Q diag(1/sqrt(lam+r)).
        W = Q * torch.sqrt(inv_diag)[None, :]
        self._fit = {"kind": "exact", "Xt": Xt, "sq": sq, "alpha": alpha, "W": W, "s2": s2, "ratio": ratio, "mu": mu, "sd": sd}

    def predict(self, X: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        if self._fit is None:
            raise NotFitted("TanimotoGP.predict called before any update")
        if self._fit["kind"] == "nystrom":
            return _finite(*self._predict_nystrom(np.asarray(X, dtype=np.float32) if X.dtype != np.float32 else X), "TanimotoGP")
        f = self._fit
        if "Xt32" not in f:
            f["Xt32"] = f["Xt"].float().T.contiguous()
        means, stds = [], []
        for start in range(0, X.shape[0], chunk):
            Ks = _tanimoto_rows(X[start : start + chunk], f["Xt32"], f["sq"], self.device)
            m = Ks @ f["alpha"]
            v = 1.0 - ((Ks @ f["W"]) ** 2).sum(1)
            means.append((m * f["sd"] + f["mu"]).cpu().numpy())
            stds.append((torch.sqrt(v.clamp_min(0.0) * f["s2"]) * f["sd"]).cpu().numpy())
        if not means:
            return np.zeros(0), np.zeros(0)
        return _finite(np.concatenate(means), np.concatenate(stds), "TanimotoGP")

    def state_dict(self) -> dict[str, Any]:
        keys = np.empty(len(self._rows), dtype=np.int64)
        for k, i in self._rows.items():
            keys[i] = k
        # Training fingerprints travel sparse (~2 % of the bytes), packing only rows added since the last time.
        return {"name": self.name, "X": self._packer.pack(self._X, self._buf), "y": self._y.copy(), "n": self._n.copy(),
                "keys": keys, "seen": self._seen,
                "max_train": self.max_train, "exact_max": self.exact_max, "landmarks": self.landmarks,
                "background_redraw": self.background_redraw,
                "Z": self._Z, "z_at": self._z_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_train = int(state["max_train"])
        X = state["X"]
        self._X = self._buf = unpack_rows(X) if isinstance(X, dict) else np.asarray(X, dtype=np.float32)
        self._y = np.asarray(state["y"], dtype=np.float64)
        self._n = np.asarray(state["n"], dtype=np.int64)
        self._seen = int(state["seen"])
        self._rows = {int(k): i for i, k in enumerate(state["keys"])}
        self.exact_max, self.landmarks = int(state["exact_max"]), int(state["landmarks"])
        self.background_redraw = bool(state.get("background_redraw", self.background_redraw))
        self._stats, self._pool_cache, self._qcache, self._delta = None, None, None, None
        if state["Z"] is not None:
            self._set_landmarks(np.asarray(state["Z"], dtype=np.float32), int(state["z_at"]))
        self._fit = None
        if self._y.shape[0]:
            self._refit()


class _MLP(torch.nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden // 2), torch.nn.ReLU(),
            torch.nn.Linear(hidden // 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class DeepEnsemble(OnlineLearner):
    """``n_members`` MLPs on ``log1p`` fingerprints, fine-tuned on every update.

    Each update warm-starts every member and trains ``epochs`` passes over all
    data seen so far (small in a lab campaign); the spread of member predictions
    is the uncertainty. Members differ by initialisation and minibatch order.
    """

    name = "ensemble"

    def __init__(self, device: str | None = None, n_members: int = 5, hidden: int = 256,
                 epochs: int = 40, lr: float = 1e-3, seed: int = 0) -> None:
        self.device = torch.device(device or default_device())
        self.n_members, self.hidden, self.epochs, self.lr, self.seed = n_members, hidden, epochs, lr, seed
        self._X = np.zeros((0, 0), dtype=np.float32)
        self._y = np.zeros(0, dtype=np.float64)
        self._members: list[_MLP] = []
        self._norm = (0.0, 1.0)

    @property
    def n_seen(self) -> int:
        return int(self._y.shape[0])

    def _build(self, d: int) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        self._members = []
        for _ in range(self.n_members):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self._members.append(_MLP(d, self.hidden).to(self.device))

    def update(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> None:
        # Replicates stay separate rows: an MLP averages them by itself.
        X, y = check_targets(X, y)
        if X.shape[0] == 0:
            return
        self._X = X.copy() if self._X.size == 0 else np.concatenate([self._X, X])
        self._y = np.concatenate([self._y, y])
        if not self._members:
            self._build(X.shape[1])
        self._train()

    def _train(self) -> None:
        mu, sd = float(self._y.mean()), float(self._y.std()) or 1.0
        self._norm = (mu, sd)
        Xt = torch.log1p(torch.from_numpy(self._X)).to(self.device)
        yt = torch.from_numpy((self._y - mu) / sd).to(self.device, torch.float32)
        n = Xt.shape[0]
        bs = min(64, n)
        gen = torch.Generator().manual_seed(self.seed + n)
        for member in self._members:
            opt = torch.optim.Adam(member.parameters(), lr=self.lr, weight_decay=1e-5)
            member.train()
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen).to(self.device)
                for s in range(0, n, bs):
                    idx = perm[s : s + bs]
                    opt.zero_grad()
                    loss = torch.nn.functional.mse_loss(member(Xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()

    @torch.no_grad()
    def predict(self, X: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        if not self._members:
            raise NotFitted("DeepEnsemble.predict called before any update")
        mu, sd = self._norm
        outs = []
        for start in range(0, X.shape[0], chunk):
            Xs = torch.log1p(torch.from_numpy(np.asarray(X[start : start + chunk], dtype=np.float32))).to(self.device)
            outs.append(torch.stack([m.eval()(Xs) for m in self._members]).double().cpu().numpy())
        if not outs:
            return np.zeros(0), np.zeros(0)
        P = np.concatenate(outs, axis=1) * sd + mu
        return _finite(P.mean(0), P.std(0), "DeepEnsemble")

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "X": self._X, "y": self._y, "norm": self._norm,
            "config": dict(n_members=self.n_members, hidden=self.hidden, epochs=self.epochs, lr=self.lr, seed=self.seed),
            "members": [{k: v.cpu() for k, v in m.state_dict().items()} for m in self._members],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["config"].items():
            setattr(self, k, v)
        self._X = np.asarray(state["X"], dtype=np.float32)
        self._y = np.asarray(state["y"], dtype=np.float64)
        self._norm = (float(state["norm"][0]), float(state["norm"][1]))
        self._members = []
        if state["members"]:
            self._build(self._X.shape[1])
            for m, sd in zip(self._members, state["members"], strict=True):
                m.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()})


LEARNERS: dict[str, Callable[..., OnlineLearner]] = {"gp": TanimotoGP, "ensemble": DeepEnsemble}


def make_learner(name: str, device: str | None = None, **kwargs: Any) -> OnlineLearner:
    """Build a registered learner by name (``"gp"`` or ``"ensemble"``)."""
    try:
        factory = LEARNERS[name]
    except KeyError:
        raise UnknownName("learner", name, list(LEARNERS)) from None
    return factory(device=device, **kwargs)

"""The Nyström (DTC) approximation of the Tanimoto GP, for training sets past the exact range.

A deterministic training conditional GP on ``L`` landmark compounds (a seeded random subset of
the training rows, re-drawn when the training set has grown fourfold). Its sufficient
statistics, the landmark Gram ``sum phi phi^T``, ``sum phi y`` and ``sum phi`` over
measurements, are accumulated as data arrive, so an update costs ``O(n_new L^2 + L^3)`` however
long the campaign, and predictions ``O(m L^2)`` with the pool's landmark features cached
between updates. Replicates weigh by their count.

Every cache is a named value (:class:`PoolFeatures`, :class:`PoolQuadratic`, ...) holding what
it was computed from, so that it is reused only while that is still what it was.
"""

from __future__ import annotations

import math
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from labloop.models.base import Standardizer
from labloop.models.tanimoto import Rows, prepare_rows, tanimoto, tanimoto_prepared

__all__ = ["GramStats", "Landmarks", "Measurements", "NystromDTC", "NystromFit"]

_BACKGROUND: list[ThreadPoolExecutor] = []


def _background() -> ThreadPoolExecutor:
    """One thread shared by all learners for work off an update's critical path."""
    if not _BACKGROUND:
        _BACKGROUND.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-landmarks"))
    return _BACKGROUND[0]


class Measurements(NamedTuple):
    """One update's measurements per compound: ``X`` (``k x d``, one row each), ``counts`` and
    ``ysum`` (length ``k``: how many replicates, and the sum of their targets)."""

    X: np.ndarray
    counts: np.ndarray
    ysum: np.ndarray


class GramStats(NamedTuple):
    """DTC sufficient statistics over every measurement: ``G = sum phi phi^T`` (``L x L``),
    ``b = sum phi y`` and ``s0 = sum phi`` (``L``)."""

    G: torch.Tensor
    b: torch.Tensor
    s0: torch.Tensor


@dataclass(frozen=True)
class Landmarks:
    """The landmark compounds and their factorization.

    Attributes:
        Z: ``L x d`` float32 fingerprints.
        at: training-set size when they were drawn.
        version: increases with every draw (pool features are cached per version).
        Lz: Cholesky factor of ``K_ZZ + 1e-6 I``; Zt32: ``d x L`` float32; zsq: squared norms.
    """

    Z: np.ndarray
    at: int
    version: int
    Lz: torch.Tensor
    Zt32: torch.Tensor
    zsq: torch.Tensor


@dataclass(frozen=True)
class StatsDelta:
    """The last incremental change of the statistics: ``before`` plus the measurements ``phi``
    (``k x L`` features) with ``counts`` gave ``after``."""

    before: GramStats
    after: GramStats
    phi: torch.Tensor
    counts: np.ndarray


@dataclass(frozen=True)
class PoolFeatures:
    """The pool's landmark features: ``pool`` (weak reference to the rows), the landmarks
    ``version``, the ``prepared`` sparse rows, ``Phi32`` (``m x L`` float32) and ``prior``
    (``m``, the prior variance left after the landmarks)."""

    pool: Any
    version: int
    prepared: list[Rows]
    Phi32: torch.Tensor
    prior: torch.Tensor


@dataclass(frozen=True)
class PoolQuadratic:
    """``q = phi^T (G + rI)^-1 phi`` over the pool, for the ``Phi32``, ``stats``, ``ratio`` and
    factor ``Wv`` it was computed with, and the incremental ``steps`` since a full product."""

    Phi32: torch.Tensor
    stats: GramStats
    ratio: float
    Wv: torch.Tensor
    q: torch.Tensor
    steps: int


@dataclass(frozen=True)
class Redraw:
    """New landmarks being prepared on the background thread, from the training rows as they
    were at ``at``; ``future`` gives their statistics and the pool's features under them."""

    Z: np.ndarray
    at: int
    zfit: dict[str, torch.Tensor]
    pool: Any
    prepared: list[Rows]
    future: Future[tuple[GramStats, torch.Tensor]]


@dataclass(frozen=True)
class NystromFit:
    """A fitted DTC GP: weights ``w`` (``L``), factor ``Wv`` (``L x L``, ``Wv Wv^T = (G + rI)^-1``),
    signal variance ``s2``, noise ``ratio``, the outcome standardization and the landmarks'
    version it was fitted on."""

    w: torch.Tensor
    Wv: torch.Tensor
    s2: float
    ratio: float
    std: Standardizer
    z_version: int


class NystromDTC:
    """The approximation's landmarks, statistics and caches for one learner.

    Args:
        landmarks: ``L``, the inducing compounds.
        device: torch device.
        background: prepare re-drawn landmarks on a background thread (the model switches one
            update later, so results depend on timing); False: at once, reproducible.
    """

    WOODBURY_STEPS = 32  # incremental variance updates between two full ones (float32 round-off)

    def __init__(self, landmarks: int, device: torch.device, background: bool) -> None:
        self.n_landmarks, self.device, self.background = landmarks, device, background
        self.landmarks: Landmarks | None = None
        self.stats: GramStats | None = None  # None: accumulate again from the stored rows
        self.delta: StatsDelta | None = None
        self.pool: PoolFeatures | None = None
        self.quadratic: PoolQuadratic | None = None
        self.redraw: Redraw | None = None
        self._since_redraw: list[Measurements] = []  # measurements since the redraw began
        self._version = 0

    @property
    def z_version(self) -> int:
        return self._version

    def forget_statistics(self) -> None:
        """Training rows were dropped: accumulate the statistics again, abandon a redraw."""
        self.stats = self.redraw = None

    # ---- landmarks ------------------------------------------------------------------------
    def features(self, X: np.ndarray | list[Rows], chunk: int = 4096,
                 zfit: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``phi(x) = L_Z^-1 k_Z(x)``: ``len(X) x L`` float64, so that ``phi(x).phi(x')`` approximates k.
        ``X`` is fingerprint rows, or the chunks :func:`prepare_rows` made of them; ``zfit`` the
        landmarks (default: the current ones)."""
        if zfit is None:
            assert self.landmarks is not None
            f = {"Lz": self.landmarks.Lz, "Zt32": self.landmarks.Zt32, "zsq": self.landmarks.zsq}
        else:
            f = zfit
        parts = X if isinstance(X, list) else [prepare_rows(X[s : s + chunk], self.device)
                                               for s in range(0, X.shape[0], chunk)]
        out = []
        for rows in parts:
            K = tanimoto_prepared(rows, f["Zt32"], f["zsq"])
            out.append(torch.linalg.solve_triangular(f["Lz"], K.T, upper=False).T)
        return torch.cat(out) if out else torch.zeros((0, f["Lz"].shape[0]), dtype=torch.float64, device=self.device)

    def _pick(self, X: np.ndarray, n: int) -> np.ndarray:
        """A deterministic random subset of the ``n`` training rows (seeded by their count)."""
        pick = np.sort(np.random.default_rng(n).choice(n, size=min(self.n_landmarks, n), replace=False))
        return X[pick].copy()

    def _factorize(self, Z: np.ndarray) -> dict[str, torch.Tensor]:
        Zt = torch.from_numpy(Z).to(self.device, torch.float64)
        zsq = (Zt * Zt).sum(1)
        Kzz = tanimoto(Zt, Zt, zsq, zsq) + 1e-6 * torch.eye(Z.shape[0], dtype=torch.float64, device=self.device)
        return {"Lz": torch.linalg.cholesky(Kzz), "Zt32": Zt.float().T.contiguous(), "zsq": zsq}

    def set_landmarks(self, Z: np.ndarray, at: int, zfit: dict[str, torch.Tensor] | None = None) -> None:
        """Use landmarks ``Z`` (drawn at training-set size ``at``); the statistics start again."""
        f = zfit if zfit is not None else self._factorize(Z)
        self._version += 1
        self.landmarks = Landmarks(Z, at, self._version, f["Lz"], f["Zt32"], f["zsq"])
        self.stats = None

    def _redraw(self, X: np.ndarray, y: np.ndarray, n: np.ndarray, new: Measurements | None) -> bool:
        """New landmarks for a grown training set, without stalling the updates that need the model now.

        A background thread computes, under the new landmarks, the pool's features and the
        training statistics of the rows as they were when it started; updates go on with the old
        landmarks meanwhile and remember their measurements. The first update after the thread
        finished switches, adding those measurements (``O(n_new L^2)``). Without a cached pool
        (nothing predicted yet) the switch is immediate. Returns True when the statistics are
        already complete for this update.
        """
        job = self.redraw
        if job is None:
            cache = self.pool
            pool = cache.pool() if cache is not None else None
            size = y.shape[0]
            Z = self._pick(X, size)
            zfit = self._factorize(Z)
            if not self.background or cache is None or pool is None:
                self.set_landmarks(Z, size, zfit)
                return False
            prepared = cache.prepared
            c, ysum = n.astype(np.float64), y * n  # rows only grow: a view of them is stable

            def work() -> tuple[GramStats, torch.Tensor]:
                Phi = self.features(X, 4096, zfit)
                ct, yt = torch.from_numpy(c).to(self.device), torch.from_numpy(ysum).to(self.device)
                return GramStats((Phi * ct[:, None]).T @ Phi, Phi.T @ yt, Phi.T @ ct), self.features(prepared, 4096, zfit)

            self.redraw = Redraw(Z, size, zfit, cache.pool, prepared, _background().submit(work))
            self._since_redraw = []
            return False
        assert new is not None
        self._since_redraw.append(new)
        if not job.future.done():
            return False
        self.redraw = None
        stats, Phi = job.future.result()
        self.set_landmarks(job.Z, job.at, job.zfit)
        for m in self._since_redraw:  # measurements that arrived while the thread worked
            stats = self._add(stats, m)
        self._since_redraw = []
        self.stats = stats
        if job.pool() is not None:
            self.pool = PoolFeatures(job.pool, self._version, job.prepared, Phi.float(),
                                     (1.0 - (Phi * Phi).sum(1)).clamp_min(0.0))
        return True

    # ---- statistics -----------------------------------------------------------------------
    def _add(self, stats: GramStats, m: Measurements, phi: torch.Tensor | None = None) -> GramStats:
        """Statistics plus measurements ``m``: one feature row per compound, however many
        replicates. ``phi``: ``m.X``'s landmark features, when the caller has them."""
        phi = self.features(m.X) if phi is None else phi
        c = torch.from_numpy(m.counts).to(self.device)
        return GramStats(stats.G + (phi * c[:, None]).T @ phi, stats.b + phi.T @ torch.from_numpy(m.ysum).to(self.device),
                         stats.s0 + phi.T @ c)

    def _statistics(self, X: np.ndarray, y: np.ndarray, n: np.ndarray, new: Measurements | None,
                    complete: bool) -> GramStats:
        """The statistics over every measurement, kept up to date (``complete``: they already
        hold this update's measurements)."""
        if complete and self.stats is not None:
            return self.stats
        if self.stats is None or new is None:  # from the stored rows: each row weighs by its count
            Phi = self.features(X)
            c = torch.from_numpy(n.astype(np.float64)).to(self.device)
            yw = torch.from_numpy(y * n).to(self.device, torch.float64)
            self.stats = GramStats((Phi * c[:, None]).T @ Phi, Phi.T @ yw, Phi.T @ c)
        else:  # add this update's measurements only
            before = self.stats
            phi = self.features(new.X)
            self.stats = self._add(before, new, phi)
            self.delta = StatsDelta(before, self.stats, phi, new.counts)
        return self.stats

    # ---- fit and predict ------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, n: np.ndarray, new: Measurements | None,
            ratios: np.ndarray, redraw: bool = True) -> NystromFit:
        """Fit on the training set: ``X`` (``N x d`` rows of distinct compounds), ``y`` (the mean
        of each one's replicates), ``n`` (their counts); ``new``: this update's measurements.
        ``redraw=False`` keeps the landmarks even if they are due to be drawn again (a learner
        restored from its state fits exactly as it was; its next update redraws)."""
        size = y.shape[0]
        if self.landmarks is None:
            self.set_landmarks(self._pick(X, size), size)
        assert self.landmarks is not None
        complete = False
        if redraw and (size > 4 * self.landmarks.at or self.redraw is not None):
            complete = self._redraw(X, y, n, new)
        G, b, s0 = self._statistics(X, y, n, new, complete)
        w = n.astype(np.float64)
        std = Standardizer.fit(y, w)
        mu, sd = std.mu, std.sd
        lam, V = torch.linalg.eigh(G)
        lam = lam.clamp_min(0.0)
        u = V.T @ ((b - mu * s0) / sd)  # V^T Phi^T C y_standardized
        yCy = float((w * ((y - mu) / sd) ** 2).sum())
        log_c = float(np.log(w).sum())
        best: tuple[float, float, float] | None = None
        for r in ratios:
            quad = (yCy - float((u * u / (lam + r)).sum())) / float(r)
            s2 = max(quad / size, 1e-12)
            nll = 0.5 * size * math.log(s2) + 0.5 * (size * math.log(float(r)) - log_c
                                                     + float(torch.log1p(lam / float(r)).sum()))
            if best is None or nll < best[0]:
                best = (nll, float(r), s2)
        assert best is not None
        _, ratio, s2 = best
        assert self.landmarks is not None
        return NystromFit(V @ (u / (lam + ratio)), V * torch.rsqrt(lam + ratio)[None, :], s2, ratio, std,
                          self.landmarks.version)

    def predict(self, f: NystromFit, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of ``m`` fingerprint rows (``X`` float32), in the targets' units."""
        cache = self.pool
        if cache is not None and cache.pool() is X and cache.version == f.z_version:
            Phi32, prior = cache.Phi32, cache.prior
        else:
            # The pool's sparse form outlives new landmarks: a redraw only redoes the products.
            prepared = cache.prepared if cache is not None and cache.pool() is X else \
                [prepare_rows(X[s : s + 4096], self.device) for s in range(0, X.shape[0], 4096)]
            Phi = self.features(prepared)
            Phi32, prior = Phi.float(), (1.0 - (Phi * Phi).sum(1)).clamp_min(0.0)
            try:
                self.pool = PoolFeatures(weakref.ref(X), f.z_version, prepared, Phi32, prior)
            except TypeError:  # not weak-referenceable (a view): no caching
                self.pool = None
        mean = (Phi32 @ f.w.float()).double()
        var = prior + f.ratio * self._quadratic(f, Phi32)
        return (mean * f.std.sd + f.std.mu).cpu().numpy(), (torch.sqrt(var * f.s2) * f.std.sd).cpu().numpy()

    def _quadratic(self, f: NystromFit, Phi32: torch.Tensor) -> torch.Tensor:
        """``q_i = phi_i^T (G + rI)^-1 phi_i`` over the pool's landmark features (``m x L``, float32).

        In full it is an ``m x L x L`` product, the bulk of a rescoring. When the only change since
        the last one is this update's measurements (``G`` plus ``U U^T``, ``U`` the ``k`` new rows'
        features weighted by their counts, same landmarks and ratio), the Woodbury identity gives
        ``q - ||Ls^-1 (A U)^T phi||^2`` with ``A = (G_old + rI)^-1`` and ``Ls Ls^T = I + U^T A U``:
        an ``m x L x k`` product. A full product every ``WOODBURY_STEPS`` keeps round-off bounded.
        """
        assert self.stats is not None
        qc, d, L = self.quadratic, self.delta, Phi32.shape[1]
        q: torch.Tensor | None = None
        steps = 0
        if qc is not None and qc.Phi32 is Phi32 and qc.ratio == f.ratio:
            if qc.stats is self.stats:  # nothing learned since: the same form
                q, steps = qc.q, qc.steps
            elif d is not None and d.before is qc.stats and d.after is self.stats and d.phi.shape[0] <= L // 2 \
                    and qc.steps < self.WOODBURY_STEPS:
                U = d.phi.T * torch.from_numpy(np.sqrt(d.counts)).to(self.device)[None, :]  # L x k
                AU = qc.Wv @ (qc.Wv.T @ U)
                S = torch.eye(U.shape[1], dtype=torch.float64, device=self.device) + U.T @ AU
                B = torch.linalg.solve_triangular(torch.linalg.cholesky(S), AU.T, upper=False)  # k x L
                P = Phi32 @ B.T.float()
                q, steps = qc.q - (P * P).sum(1).double(), qc.steps + 1
        if q is None:  # float32 for the m x L x L product; the sums stay float64
            proj = Phi32 @ f.Wv.float()
            q = (proj * proj).sum(1).double()
        self.quadratic = PoolQuadratic(Phi32, self.stats, f.ratio, f.Wv, q, steps)
        return q

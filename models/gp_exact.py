"""The exact Tanimoto GP: one eigendecomposition of the training Gram matrix per fit.

Cost: ``O(n^3)`` per fit of ``n`` distinct compounds, ``O(n m nnz)`` per prediction of ``m`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from labloop.models.base import Standardizer
from labloop.models.tanimoto import tanimoto, tanimoto_rows

__all__ = ["ExactFit", "fit_exact"]


@dataclass
class ExactFit:
    """A fitted exact GP.

    Attributes:
        Xt: ``n x d`` training fingerprints, float64 on the device.
        sq: their squared norms (``n``).
        alpha: ``(K + rI)^-1 y`` of the standardized targets (``n``).
        W: ``n x n`` factor with ``W W^T = (K + rI)^-1``.
        s2: signal variance (standardized units); ratio: noise variance / signal variance.
        std: the outcome standardization.
    """

    Xt: torch.Tensor
    sq: torch.Tensor
    alpha: torch.Tensor
    W: torch.Tensor
    s2: float
    ratio: float
    std: Standardizer
    _Xt32: torch.Tensor | None = None

    def predict(self, X: np.ndarray, device: torch.device, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of ``m`` fingerprint rows, in the targets' units (length-``m`` float64)."""
        if self._Xt32 is None:
            self._Xt32 = self.Xt.float().T.contiguous()
        means, stds = [], []
        for start in range(0, X.shape[0], chunk):
            Ks = tanimoto_rows(X[start : start + chunk], self._Xt32, self.sq, device)
            m = Ks @ self.alpha
            v = 1.0 - ((Ks @ self.W) ** 2).sum(1)
            means.append((m * self.std.sd + self.std.mu).cpu().numpy())
            stds.append((torch.sqrt(v.clamp_min(0.0) * self.s2) * self.std.sd).cpu().numpy())
        if not means:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(means), np.concatenate(stds)


def fit_exact(X: np.ndarray, y: np.ndarray, device: torch.device, ratios: np.ndarray) -> ExactFit:
    """Fit signal variance and noise by maximum marginal likelihood over the noise ``ratios``.

    Args:
        X: ``n x d`` float32 fingerprints of distinct compounds.
        y: their ``n`` targets (the mean of each compound's replicates), higher is better.
    """
    Xt = torch.from_numpy(X).to(device, torch.float64)
    sq = (Xt * Xt).sum(1)
    K = tanimoto(Xt, Xt, sq, sq)
    lam, Q = torch.linalg.eigh(K)
    lam = lam.clamp_min(0.0)
    std = Standardizer.fit(y)
    yt = torch.from_numpy(std.transform(y)).to(device, torch.float64)
    z = Q.T @ yt
    n = yt.shape[0]
    best: tuple[float, float, float] | None = None
    for r in ratios:
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
    return ExactFit(Xt, sq, alpha, W, s2, ratio, std)

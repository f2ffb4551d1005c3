"""The Tanimoto kernel on count fingerprints, dense or as a sparse × dense product.

``tanimoto(a, b)`` is the continuous Tanimoto similarity ``<a,b> / (|a|^2 + |b|^2 - <a,b>)``,
in [0, 1]. On the CPU fingerprint rows go sparse (CSR), since they are ~2 % dense.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["Rows", "prepare_rows", "tanimoto", "tanimoto_prepared", "tanimoto_rows"]

# torch flags CSR tensors as beta; labloop uses only CSR @ dense, which is stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def tanimoto(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Continuous Tanimoto similarity ``<a,b> / (|a|^2 + |b|^2 - <a,b>)``: ``n x m`` in [0, 1]."""
    dot = a @ b.T
    denom = a_sq[:, None] + b_sq[None, :] - dot
    return torch.where(denom > 0, dot / denom.clamp_min(1e-12), torch.ones_like(dot))


Rows = tuple[torch.Tensor, torch.Tensor]  # fingerprint rows ready for products: (CSR or dense float32, squared norms)


def prepare_rows(X: np.ndarray, device: torch.device) -> Rows:
    """Fingerprint rows ``X`` (``m x d``) as an operand for :func:`tanimoto_prepared`: sparse CSR on
    CPU, dense on CUDA, with their squared norms (float64; exact, the counts are small integers)."""
    X = np.asarray(X, dtype=np.float32)
    Xs = torch.from_numpy(X).to(device)
    if device.type == "cpu":
        return Xs.to_sparse_csr(), torch.from_numpy(np.einsum("ij,ij->i", X, X).astype(np.float64))
    return Xs, (Xs * Xs).sum(1).double()


def tanimoto_prepared(rows: Rows, Tt32: torch.Tensor, t_sq: torch.Tensor) -> torch.Tensor:
    """Tanimoto similarity of prepared rows to the columns of ``Tt32`` (``d x n`` float32, squared norms ``t_sq``)."""
    Xs, sq = rows
    dot = (torch.sparse.mm(Xs, Tt32) if Xs.layout == torch.sparse_csr else Xs @ Tt32).double()
    denom = sq[:, None] + t_sq[None, :] - dot
    return torch.where(denom > 0, dot / denom.clamp_min(1e-12), torch.ones_like(dot))


def tanimoto_rows(X: np.ndarray, Tt32: torch.Tensor, t_sq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Tanimoto similarity of fingerprint rows ``X`` (``m x d``) to the columns of ``Tt32``
    (``d x n``, float32) whose squared norms are ``t_sq``: ``m x n`` float64.

    Fingerprints are ~2% dense (49 of 2048 columns on Enamine 10k), so on CPU a sparse
    product is cheaper (measured: 0.11 s against 0.35 s dense float32 and 0.94 s float64 for
    10,560 x 1,000). Counts are small integers, so float32 dot products are exact while they
    stay below 2**24.
    """
    return tanimoto_prepared(prepare_rows(X, device), Tt32, t_sq)

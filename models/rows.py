"""Fingerprint matrices stored sparse: ~2 % of their bytes, for checkpoints and the model process.

Count fingerprints are ~2 % dense (49 of 2,048 columns on Enamine 10k).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

__all__ = ["RowPacker", "pack_rows", "unpack_rows"]


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

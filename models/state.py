"""State as data: a tree of JSON values and named NumPy arrays, never code.

Learners, policies and pools describe themselves as nested dicts and lists of plain values
and arrays (``state_dict``). :func:`flatten` splits such a tree into JSON-able metadata and a
flat ``name -> array`` map, ready for ``numpy.savez``; :func:`unflatten` puts it back. Reading
it back runs no code (``numpy.load(..., allow_pickle=False)`` and ``json.loads``), unlike a
pickle, which can run anything its bytes name.

>>> arrays: dict[str, np.ndarray] = {}
>>> meta = flatten({"w": np.arange(3.0), "n": 2, "cfg": {"r": float("nan")}}, arrays, "m")
>>> sorted(arrays), meta["w"]
(['m/w'], {'__array__': 'm/w'})
>>> back = unflatten(meta, arrays)
>>> back["w"].tolist(), back["n"], math.isnan(back["cfg"]["r"])
([0.0, 1.0, 2.0], 2, True)
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any

import numpy as np
import torch

from labloop.models.errors import ModelError

__all__ = ["StateError", "dumps", "flatten", "loads", "pack_strings", "unflatten", "unpack_strings"]


class StateError(ModelError):
    """A state tree that cannot be stored, or stored state that does not read back."""


def flatten(tree: Any, arrays: dict[str, np.ndarray], prefix: str) -> Any:
    """JSON-able metadata for ``tree``; its arrays (NumPy, or torch tensors, moved to the CPU) go
    into ``arrays`` under names starting with ``prefix``. Tuples come back as lists; non-finite
    floats are kept (JSON has no NaN)."""
    if isinstance(tree, torch.Tensor):
        tree = tree.detach().cpu().numpy()
    if isinstance(tree, np.ndarray):
        if tree.dtype == object:
            raise StateError(f"{prefix}: object arrays are not stored (they would need pickle)")
        arrays[prefix] = tree
        return {"__array__": prefix}
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, float) and not math.isfinite(tree):
        return {"__float__": repr(tree)}
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise StateError(f"{prefix}: dict keys must be strings")
        return {k: flatten(v, arrays, f"{prefix}/{k}") for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [flatten(v, arrays, f"{prefix}/{i}") for i, v in enumerate(tree)]
    raise StateError(f"{prefix}: cannot store a {type(tree).__name__}")


def unflatten(meta: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`flatten`.

    Raises:
        StateError: an array the metadata names is missing.
    """
    if isinstance(meta, dict):
        if set(meta) == {"__array__"}:
            try:
                return arrays[meta["__array__"]]
            except KeyError:
                raise StateError(f"stored state lacks array {meta['__array__']!r}") from None
        if set(meta) == {"__float__"}:
            return float(meta["__float__"])
        return {k: unflatten(v, arrays) for k, v in meta.items()}
    if isinstance(meta, list):
        return [unflatten(v, arrays) for v in meta]
    return meta


def pack_strings(items: list[str]) -> dict[str, np.ndarray]:
    """Strings as two arrays: their UTF-8 bytes back to back and each one's length in bytes.

    >>> unpack_strings(pack_strings(["a", "", "é\\n"]))
    ['a', '', 'é\\n']
    """
    encoded = [s.encode() for s in items]
    return {"bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
            "lengths": np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))}


def unpack_strings(packed: dict[str, np.ndarray]) -> list[str]:
    """Inverse of :func:`pack_strings`."""
    data = packed["bytes"].tobytes()
    ends = np.cumsum(packed["lengths"]).tolist()
    if (ends[-1] if ends else 0) != len(data):
        raise StateError("packed strings: lengths do not add up to the bytes")
    out, start = [], 0
    for end in ends:
        out.append(data[start:end].decode())
        start = end
    return out


_META = "__meta__"


def dumps(tree: Any) -> bytes:
    """``tree`` as one ``.npz`` archive: its arrays, plus its metadata as UTF-8 JSON under ``__meta__``.

    >>> loads(dumps({"a": np.ones(2, np.float32), "b": [1, "x"]}))["a"].dtype
    dtype('float32')
    """
    arrays: dict[str, np.ndarray] = {}
    meta = flatten(tree, arrays, "s")
    buf = io.BytesIO()
    members: dict[str, Any] = {_META: np.frombuffer(json.dumps(meta, allow_nan=False).encode(), dtype=np.uint8), **arrays}
    np.savez(buf, **members)
    return buf.getvalue()


def loads(blob: bytes) -> Any:
    """Inverse of :func:`dumps`; runs no code whatever the bytes hold.

    Raises:
        StateError: the bytes are not such an archive.
    """
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            meta = json.loads(z[_META].tobytes())
            arrays = {k: z[k] for k in z.files if k != _META}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise StateError(f"not a stored state: {type(exc).__name__}: {exc}") from exc
    return unflatten(meta, arrays)

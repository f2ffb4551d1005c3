"""Events as columns: a batch of rows per table, Arrow arrays for the insert, natural-key admission.

A columnizer (``Table.rows``) turns one event into ``(n_rows, columns)``; :class:`Batch`
appends those columns for one table with the offset ranges they came from, drops rows whose
natural key :class:`Seen` has stored, and yields one Arrow table per insert and a deterministic
deduplication token.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable
from itertools import islice, repeat
from typing import Any

import numpy as np
import pyarrow as pa

from labloop.consumers.tables import PROVENANCE, ROWS_OF_TOPIC, Table
from labloop.schemas.types import Record

__all__ = ["Batch", "Key", "Seen"]

log = logging.getLogger("labloop.sink")

Key = Hashable


def _row_keys(table: Table, n: int, values: dict[str, Any]) -> list[Key]:
    """The natural key of each of the ``n`` rows a columnizer produced."""
    cols = [values.get(c) for c in table.key]
    if len(cols) == 1:
        v = cols[0]
        return v if isinstance(v, list) else [v] * n
    return list(zip(*[v if isinstance(v, list) else repeat(v, n) for v in cols], strict=False))


class Seen:
    """Natural keys stored per table, as hashes, forgetting the oldest beyond ``cap`` per table."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.keys: dict[str, dict[int, None]] = defaultdict(dict)
        self.dropped = 0  # rows not stored because a row with their key was

    def add(self, table: str, keys: Iterable[Key]) -> None:
        self._remember(self.keys[table], [hash(k) for k in keys])

    def admit(self, table: str, keys: list[Key]) -> list[bool] | None:
        """Which rows are new (and remember them); None when all are."""
        d = self.keys[table]
        keep: list[bool] = []
        fresh: dict[int, None] = {}
        for h in map(hash, keys):
            ok = h not in d and h not in fresh
            keep.append(ok)
            if ok:
                fresh[h] = None
        self.dropped += len(keep) - len(fresh)
        self._remember(d, fresh)
        return None if len(fresh) == len(keep) else keep

    def _remember(self, d: dict[int, None], hs: Iterable[int]) -> None:
        d.update(dict.fromkeys(hs))
        if len(d) > self.cap:
            for h in list(islice(d, len(d) - self.cap)):
                del d[h]


class Batch:
    """Columns accumulated for one table, plus the offset ranges they came from.

    The deduplication token names the cluster and, per topic-partition, the offset range
    and the first message's timestamp: re-reading the same messages gives the same token,
    while a new broker or a recreated topic that reuses offsets does not.
    """

    def __init__(self, table: Table, cluster: str = "") -> None:
        self.table = table
        self.cluster = cluster
        self.names = [n for n, _ in table.columns] + [n for n, _ in PROVENANCE]
        self.columns: list[_Column] = [_Column() for _ in self.names]
        self._arrays = {n for n, typ in table.columns if typ.startswith("Array(")}  # a list there is one row's value
        self.ranges: dict[tuple[str, int], list[int]] = {}
        self.rows = 0

    def add(self, record: Record, topic: str, partition: int, offset: int, timestamp_ms: int = 0,
            seen: Seen | None = None) -> int:
        """Append the record's rows (those whose key ``seen`` has not stored yet); returns how many."""
        n, values = ROWS_OF_TOPIC.get(topic, self.table.rows)(record)
        if seen is not None and self.table.key:
            keep = seen.admit(self.table.name, _row_keys(self.table, n, values))
            if keep is not None:
                n = sum(keep)
                if not n:
                    return 0
                values = {k: [x for x, ok in zip(v, keep, strict=True) if ok] if isinstance(v, list) else v
                          for k, v in values.items()}
        for col, name in zip(self.columns, self.names[:-4], strict=False):
            v = values.get(name)
            if isinstance(v, list) and name not in self._arrays:
                col.extend(v)
            else:
                col.run(v, n)
        self.columns[-4].run(self.cluster, n)
        self.columns[-3].run(topic, n)
        self.columns[-2].run(partition, n)
        self.columns[-1].run(offset, n)
        self.rows += n
        r = self.ranges.setdefault((topic, partition), [offset, offset, timestamp_ms])
        if offset < r[0]:
            r[0], r[2] = offset, timestamp_ms
        r[1] = max(r[1], offset)
        return n

    @property
    def size(self) -> int:
        return self.rows

    def arrow(self) -> pa.Table:
        types = dict([*self.table.columns, *PROVENANCE])
        return pa.table([c.arrow(n, types[n]) for n, c in zip(self.names, self.columns, strict=True)], names=self.names)

    def token(self) -> str:
        ranges = ";".join(f"{t}:{p}:{a}-{b}@{ts}" for (t, p), (a, b, ts) in sorted(self.ranges.items()))
        return f"{self.table.name}|{self.cluster}|{ranges}"


_ARROW = {"String": pa.string(), "Float64": pa.float64(), "Int32": pa.int32(), "Int64": pa.int64(),
          "UInt16": pa.uint16(), "UInt64": pa.uint64(), "Bool": pa.bool_()}


def _arrow_type(typ: str) -> pa.DataType:
    if typ == "Map(String, Int64)":
        return pa.map_(pa.string(), pa.int64())
    if typ == "Array(String)":
        return pa.list_(pa.string())
    inner = re.sub(r"^(Nullable|LowCardinality)\((.*)\)$", r"\2", typ)
    inner = re.sub(r"^(Nullable|LowCardinality)\((.*)\)$", r"\2", inner)
    if inner.startswith("DateTime64"):
        return pa.timestamp("ms", tz="UTC")
    return _ARROW[inner]


class _Column:
    """One column's values in arrival order: runs of a repeated value (a plate's campaign,
    a message's offset) while only runs arrive, per-row values once any list arrives.
    Runs become Arrow arrays with NumPy and dictionary encoding, not a Python object per row."""

    __slots__ = ("lengths", "runs", "values")

    def __init__(self) -> None:
        self.runs: list[Any] = []
        self.lengths: list[int] = []
        self.values: list[Any] | None = None

    def run(self, v: Any, n: int) -> None:
        if self.values is not None:
            self.values.extend(repeat(v, n))
        else:
            self.runs.append(v)
            self.lengths.append(n)

    def extend(self, vs: list[Any]) -> None:
        if self.values is None:
            self.values = [v for v, n in zip(self.runs, self.lengths, strict=True) for _ in range(n)]
        self.values.extend(vs)

    def arrow(self, name: str, typ: str) -> pa.Array:
        if self.values is not None:
            return _arrow_column(name, typ, self.values)
        t = _arrow_type(typ)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if (any(v is None for v in self.runs) or name in ("raw", "source_key") or pa.types.is_boolean(t)
                or pa.types.is_map(t) or pa.types.is_list(t)):
            return _arrow_column(name, typ, [v for v, n in zip(self.runs, self.lengths, strict=True) for _ in range(n)])
        if pa.types.is_string(t):
            indices = np.repeat(np.arange(len(self.runs), dtype=np.int32), lengths)
            return pa.DictionaryArray.from_arrays(indices, pa.array(self.runs, pa.string())).cast(pa.string())
        if pa.types.is_timestamp(t):
            return pa.array(np.repeat(np.asarray(self.runs, dtype=np.int64), lengths)).cast(t)
        return pa.array(np.repeat(np.asarray(self.runs), lengths), type=t)


def _arrow_column(name: str, typ: str, values: list[Any]) -> pa.Array:
    """Epoch-millisecond ints become timestamps without a Python datetime per row."""
    t = _arrow_type(typ)
    if pa.types.is_timestamp(t):
        return pa.array(values, type=pa.int64()).cast(t)
    if name in ("raw", "source_key"):  # bytes kept verbatim: Arrow binary lands in a String column as is
        return pa.array(values, type=pa.binary())
    return pa.array(values, type=t)



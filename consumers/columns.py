"""Events as columns: a batch of rows per table, Arrow arrays for the insert, natural-key admission.

A columnizer (``Table.rows``) turns one event into ``(n_rows, columns)``; :class:`Batch`
appends those columns for one table with the offset ranges they came from, drops rows whose
natural key :class:`Seen` has stored, and yields one Arrow table per insert and a deterministic
deduplication token.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import pyarrow as pa

from labloop.consumers.plates import PlatePositions, strings
from labloop.consumers.tables import ONE_ROW, PROVENANCE, QUALIFIERS, ROWS_OF_TOPIC, Table
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
    """Natural keys stored per table, as hashes, forgetting the oldest beyond ``cap`` per table.

    Per table, a set of the hashes (what :meth:`admit` asks) and the order they came in, in lists
    of a few thousand (what forgetting takes from): a plate's keys go in with two set operations,
    not one Python step each.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.keys: dict[str, set[int]] = defaultdict(set)
        self._order: dict[str, deque[list[int]]] = defaultdict(deque)
        self._count: dict[str, int] = defaultdict(int)
        self.dropped = 0  # rows not stored because a row with their key was

    def add(self, table: str, keys: Iterable[Key]) -> None:
        known = self.keys[table]
        self._remember(table, [h for h in dict.fromkeys(map(hash, keys)) if h not in known])

    def admit(self, table: str, keys: Sequence[Key]) -> list[bool] | None:
        """Which rows are new (and remember them); None when all are."""
        known = self.keys[table]
        hashes = list(map(hash, keys))
        if len(set(hashes)) == len(hashes) and known.isdisjoint(hashes):  # the usual case, without a loop here
            self._remember(table, hashes)
            return None
        keep: list[bool] = []
        fresh: dict[int, None] = {}
        for h in hashes:
            ok = h not in known and h not in fresh
            keep.append(ok)
            if ok:
                fresh[h] = None
        self.dropped += len(keep) - len(fresh)
        self._remember(table, list(fresh))
        return None if len(fresh) == len(keep) else keep

    def _remember(self, table: str, hashes: list[int]) -> None:
        """Store ``hashes`` (none of them stored yet), then forget the oldest beyond the cap."""
        if not hashes:
            return
        known, order = self.keys[table], self._order[table]
        known.update(hashes)
        if order and len(order[-1]) < 4096:  # few containers for the garbage collector to walk
            order[-1].extend(hashes)
        else:
            order.append(list(hashes))
        self._count[table] += len(hashes)
        over = self._count[table] - self.cap
        while over > 0:
            oldest = order[0]
            if len(oldest) <= over:
                order.popleft()
                known.difference_update(oldest)
                gone = len(oldest)
            else:
                known.difference_update(oldest[:over])
                order[0] = oldest[over:]
                gone = over
            self._count[table] -= gone
            over -= gone


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
        self._listed = 0  # rows in self.columns
        self._one: list[list[Any]] = []  # rows of one-row events, each a value per name
        self._plates: list[tuple[bytes, PlatePositions, int, int]] = []  # (message, wells kept, partition, offset)
        self._topic: str | None = None  # the plates' topic

    def add(self, record: Record, topic: str, partition: int, offset: int, timestamp_ms: int = 0,
            seen: Seen | None = None) -> int:
        """Append the record's rows (those whose key ``seen`` has not stored yet); returns how many."""
        columnize = ROWS_OF_TOPIC.get(topic, self.table.rows)
        n, values = columnize(record)
        if seen is not None and self.table.key:
            keep = seen.admit(self.table.name, _row_keys(self.table, n, values))
            if keep is not None:
                n = sum(keep)
                if not n:
                    return 0
                values = {k: [x for x, ok in zip(v, keep, strict=True) if ok] if isinstance(v, list) else v
                          for k, v in values.items()}
        if columnize in ONE_ROW:  # a row as a list (columns are made in arrow()): most events are one row
            self._one.append([*map(values.get, self.names[:-4]), self.cluster, topic, partition, offset])
            self.rows += 1
            self._range(topic, partition, offset, timestamp_ms)
            return 1
        self._listed += n
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
        self._range(topic, partition, offset, timestamp_ms)
        return n

    def add_plate(self, message: bytes, wells: PlatePositions, topic: str, partition: int, offset: int,
                  timestamp_ms: int = 0, seen: Seen | None = None) -> int:
        """Append a plate that :func:`~labloop.consumers.plates.decode_plate` read (the readings
        table only): the same rows :meth:`add` makes of the decoded record, built as Arrow arrays
        for the whole batch in :meth:`arrow`; returns how many (those ``seen`` had not stored)."""
        if self._topic is None:
            self._topic = topic
        elif topic != self._topic:
            raise ValueError(f"one batch holds plates of one topic: {self._topic}, not {topic}")
        if seen is not None and self.table.key and wells.n:
            strs = wells.strs
            ids = [message[a:a + b].decode() for a, b in zip(strs[:, 0].tolist(), strs[:, 1].tolist(), strict=True)]
            keep = seen.admit(self.table.name, ids)
            if keep is not None:
                mask = np.asarray(keep, dtype=bool)
                wells = PlatePositions(wells.header, strs[mask], wells.values[mask], wells.qualifiers[mask])
                if not wells.n:
                    return 0
        if wells.n:
            self._plates.append((message, wells, partition, offset))
            self.rows += wells.n
        self._range(topic, partition, offset, timestamp_ms)
        return wells.n

    def _range(self, topic: str, partition: int, offset: int, timestamp_ms: int) -> None:
        r = self.ranges.setdefault((topic, partition), [offset, offset, timestamp_ms])
        if offset < r[0]:
            r[0], r[2] = offset, timestamp_ms
        r[1] = max(r[1], offset)

    @property
    def size(self) -> int:
        return self.rows

    def arrow(self) -> pa.Table:
        types = dict([*self.table.columns, *PROVENANCE])
        parts = []
        if self._listed or not (self._one or self._plates):
            parts.append(pa.table([c.arrow(n, types[n]) for n, c in zip(self.names, self.columns, strict=True)],
                                  names=self.names))
        if self._one:
            columns = zip(*self._one, strict=True)  # rows -> columns
            parts.append(pa.table([_arrow_column(n, types[n], list(vs)) for n, vs in zip(self.names, columns, strict=True)],
                                  names=self.names))
        if self._plates:
            parts.append(self._plates_arrow(pa.schema([(n, _arrow_type(types[n])) for n in self.names])))
        return parts[0] if len(parts) == 1 else pa.concat_tables([parts[0], *(t.cast(parts[0].schema) for t in parts[1:])])

    def _plates_arrow(self, schema: pa.Schema) -> pa.Table:
        """The rows of every :meth:`add_plate`, as ``schema``: one buffer of all their messages,
        each column gathered from it at once."""
        msgs = [m for m, _, _, _ in self._plates]
        base = np.cumsum([0] + [len(m) for m in msgs[:-1]], dtype=np.int64)
        buf = np.frombuffer(b"".join(msgs), dtype=np.uint8)
        counts = np.asarray([w.n for _, w, _, _ in self._plates], dtype=np.int64)
        strs = np.concatenate([w.strs for _, w, _, _ in self._plates])
        strs[:, 0::2] += np.repeat(base, counts)[:, None]
        headers = np.stack([w.header for _, w, _, _ in self._plates])
        headers[:, 0:10:2] += base[:, None]

        def per_plate(k: int) -> pa.Array:  # header string k, repeated over its plate's wells
            runs = strings(buf, headers[:, 2 * k], headers[:, 2 * k + 1])
            return pa.DictionaryArray.from_arrays(np.repeat(np.arange(len(msgs), dtype=np.int32), counts),
                                                  runs).cast(pa.string())

        def per_plate_ts(k: int) -> pa.Array:
            return pa.array(np.repeat(headers[:, 10 + k], counts)).cast(pa.timestamp("ms", tz="UTC"))

        qual = pa.DictionaryArray.from_arrays(np.concatenate([w.qualifiers for _, w, _, _ in self._plates]),
                                              pa.array(QUALIFIERS, pa.string())).cast(pa.string())
        zeros = np.zeros(int(counts.sum()), dtype=np.int32)

        def same(v: str) -> pa.Array:  # one value on every row
            return pa.array([v], pa.string()).take(zeros)

        cols: dict[str, pa.Array] = {
            "reading_id": strings(buf, strs[:, 0], strs[:, 1]), "compound_id": strings(buf, strs[:, 2], strs[:, 3]),
            "well": strings(buf, strs[:, 4], strs[:, 5]), "request_id": strings(buf, strs[:, 6], strs[:, 7]),
            "value": pa.array(np.concatenate([w.values for _, w, _, _ in self._plates])), "qualifier": qual,
            "plate_id": per_plate(0), "campaign_id": per_plate(1), "assay_id": per_plate(2), "unit": per_plate(3),
            "instrument_id": per_plate(4), "event_time": per_plate_ts(0), "ingest_time": per_plate_ts(1),
            "_cluster": same(self.cluster), "_topic": same(self._topic or ""),
            "_partition": pa.array(np.repeat(np.asarray([p for _, _, p, _ in self._plates]), counts), pa.uint16()),
            "_offset": pa.array(np.repeat(np.asarray([o for _, _, _, o in self._plates]), counts), pa.uint64())}
        return pa.table([cols[f.name].cast(f.type) for f in schema], schema=schema)

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



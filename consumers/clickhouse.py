"""Every topic lands in ClickHouse: tables, the sink, and the HTTP bridge for chDB.

The sink consumes all catalogue topics, turns events into columns, inserts one
columnar batch per table, and commits Kafka offsets only after ClickHouse
acknowledged the insert (at-least-once). Each insert carries a deterministic
``insert_deduplication_token`` built from the topic-partition-offset ranges it
holds, and tables keep a ``non_replicated_deduplication_window``, so re-reading
the same range after a crash inserts nothing twice.

Events re-sent with new offsets (an instrument re-publishing a reading, a worker
re-emitting after a crash) are a second kind of duplicate: each table names the
natural key of its rows (``Table.key``), and the sink drops a row whose key it
has stored before, within a window of the latest ``dedup_keys`` keys per table
that it reloads from ClickHouse when it starts.

chDB lets one process open a data directory; the sink is that process, and it
answers ClickHouse's HTTP interface on loopback (:class:`HttpBridge`) so that
``labloop sql``, clickhouse-connect and other clients can query while it runs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice, repeat
from typing import Any
from urllib.parse import parse_qs, urlparse

import clickhouse_connect
import numpy as np
import pyarrow as pa
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from labloop.consumers.errors import SinkError
from labloop.consumers.kafka import make_consumer
from labloop.schemas import TOPICS, Codec, DecodeError
from labloop.schemas.types import Record

__all__ = ["ClickHouseSink", "HttpBridge", "TABLES", "connect", "create_tables"]

log = logging.getLogger("labloop.sink")
_QUAL = {"EQ": "=", "LT": "<", "GT": ">"}
_PROVENANCE = [("_cluster", "LowCardinality(String)"), ("_topic", "LowCardinality(String)"), ("_partition", "UInt16"),
               ("_offset", "UInt64")]


@dataclass(frozen=True)
class Table:
    """A ClickHouse table: columns ``(name, type)``, sort key, how a record becomes rows, and
    ``key``, the columns that identify a row (an event re-sent with the same key is stored once;
    empty = rows are not deduplicated by content)."""

    name: str
    columns: list[tuple[str, str]]
    order_by: str
    rows: Callable[[Record], Columns]
    key: tuple[str, ...] = ()


# A columnizer turns one event into ``(n_rows, columns)``: each column a list of n values,
# or one value shared by all n rows (a plate's campaign, say). Building columns with one
# comprehension each, instead of a dict per row, is what lets the sink keep up with plates.
Columns = tuple[int, dict[str, Any]]


def _same(r: Record) -> Columns:
    return 1, r


def _reading(r: Record) -> Columns:
    return 1, {**r, "qualifier": _QUAL[r["qualifier"]], "plate_id": None, "well": None}


def _plate(p: Record) -> Columns:
    wells = p["wells"]
    return len(wells), {
        "reading_id": [w["reading_id"] for w in wells], "compound_id": [w["compound_id"] for w in wells],
        "value": [w["value"] for w in wells], "qualifier": [_QUAL[w["qualifier"]] for w in wells],
        "request_id": [w["request_id"] for w in wells], "well": [w["well"] for w in wells],
        "campaign_id": p["campaign_id"], "assay_id": p["assay_id"], "unit": p["unit"],
        "instrument_id": p["instrument_id"], "plate_id": p["plate_id"], "event_time": p["event_time"],
        "ingest_time": p["ingest_time"]}


def _prediction(p: Record) -> Columns:
    items = p["items"]
    return len(items), {
        "compound_id": [it["compound_id"] for it in items], "mean": [it["mean"] for it in items],
        "std": [it["std"] for it in items], "campaign_id": p["campaign_id"], "model_version": p["model_version"],
        "assay_id": p["assay_id"], "event_time": p["event_time"]}


TS = "DateTime64(3, 'UTC')"
S, LS = "String", "LowCardinality(String)"
TABLES: dict[str, Table] = {t.name: t for t in (
    Table("campaigns", [("campaign_id", S), ("objective_assay_id", LS), ("direction", LS), ("unit", LS),
                        ("batch_size", "Int32"), ("init_size", "Int32"), ("budget", "Int32"), ("min_pool_size", "Int64"),
                        ("policy", LS), ("learner", LS), ("schedule", LS), ("request_ttl_s", "Float64"),
                        ("seed", "Int64"), ("event_time", TS)], "(campaign_id, event_time)", _same, ("campaign_id", "event_time")),
    Table("compounds", [("campaign_id", S), ("compound_id", S), ("smiles", S), ("source", LS), ("event_time", TS),
                        ("ingest_time", TS)], "(campaign_id, compound_id)", _same, ("campaign_id", "compound_id")),
    Table("readings", [("reading_id", S), ("campaign_id", S), ("compound_id", S), ("assay_id", LS),
                       ("value", "Float64"), ("unit", LS), ("qualifier", LS), ("request_id", "Nullable(String)"),
                       ("instrument_id", LS), ("plate_id", "Nullable(String)"), ("well", "Nullable(String)"),
                       ("event_time", TS), ("ingest_time", TS)], "(campaign_id, assay_id, compound_id, event_time)", _reading,
          ("reading_id",)),
    Table("predictions", [("campaign_id", S), ("model_version", "Int64"), ("assay_id", LS), ("compound_id", S),
                          ("mean", "Float64"), ("std", "Float64"), ("event_time", TS)],
          "(campaign_id, model_version, compound_id)", _prediction),  # derived, and versions are never reused: no key
    Table("requests", [("request_id", S), ("campaign_id", S), ("compound_id", S), ("smiles", S), ("assay_id", LS),
                       ("priority", "Int32"), ("sequence", "Int64"), ("batch", "Int32"), ("policy", LS),
                       ("acquisition_score", "Nullable(Float64)"), ("predicted_mean", "Nullable(Float64)"),
                       ("predicted_std", "Nullable(Float64)"), ("model_version", "Int64"),
                       ("trained_on", "Map(String, Int64)"), ("event_time", TS),
                       ("expires_at", TS)], "(campaign_id, sequence)", _same, ("request_id",)),
    Table("request_status", [("request_id", S), ("campaign_id", S), ("compound_id", S), ("status", LS),
                             ("robot_id", LS), ("reason", "Nullable(String)"), ("event_time", TS)],
          "(campaign_id, request_id, event_time)", _same, ("request_id", "status")),
    Table("model_updates", [("campaign_id", S), ("model_version", "Int64"), ("learner", LS), ("device", LS),
                            ("n_train", "Int64"), ("n_new", "Int64"), ("n_measured", "Int64"), ("n_failed", "Int64"),
                            ("n_pending", "Int64"), ("n_requested", "Int64"), ("pool_size", "Int64"),
                            ("best_value", "Nullable(Float64)"), ("train_s", "Float64"), ("done", "Bool"), ("n_readings", "Int64"),
                            ("trained_on", "Map(String, Int64)"),
                            ("event_time", TS)], "(campaign_id, model_version, event_time)", _same,
          ("campaign_id", "model_version", "done")),
    Table("dead_letters", [("source_topic", LS), ("source_partition", "Int32"), ("source_offset", "Int64"),
                           ("source_key", "Nullable(String)"), ("stage", LS), ("service", LS), ("error_class", LS),
                           ("error_message", S), ("raw", S), ("event_time", TS)],
          "(source_topic, source_partition, source_offset)", _same,
          ("source_topic", "source_partition", "source_offset", "error_message")),
)}
_TABLE_OF_TOPIC = {t.name: TABLES[t.table] for t in TOPICS.values()}
_SCHEMAS_OF_TOPIC = {t.name: t.schemas for t in TOPICS.values()}
# Topics whose events become rows differently from their table's default (plates -> one row per well).
_ROWS_OF_TOPIC: dict[str, Callable[[Record], Columns]] = {TOPICS["plates"].name: _plate}


def connect(dsn: str, database: str | None = None) -> Client:
    """A clickhouse-connect client for ``chdb:///path`` (in-process) or ``http(s)://...``."""
    try:
        client = clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:  # clickhouse-connect raises several unrelated types on connect
        raise SinkError(f"cannot connect to ClickHouse at {dsn}: {exc}") from exc
    if database:
        client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.database = database
    return client


def create_tables(client: Client, dedup_window: int = 10_000) -> None:
    """Create every missing table and add columns that newer schemas introduced (idempotent)."""
    for t in TABLES.values():
        cols = [*t.columns, *_PROVENANCE]
        client.command(f"CREATE TABLE IF NOT EXISTS {t.name} ({', '.join(f'`{n}` {typ}' for n, typ in cols)}) "
                       f"ENGINE = MergeTree ORDER BY {t.order_by} "
                       f"SETTINGS non_replicated_deduplication_window = {dedup_window}")
        existing = {r[0] for r in client.query(f"SELECT name FROM system.columns WHERE database = currentDatabase() "
                                                f"AND table = '{t.name}'").result_rows}
        for n, typ in cols:
            if n not in existing:
                client.command(f"ALTER TABLE {t.name} ADD COLUMN IF NOT EXISTS `{n}` {typ}")


Key = Hashable


def _row_keys(table: Table, n: int, values: dict[str, Any]) -> list[Key]:
    """The natural key of each of the ``n`` rows a columnizer produced."""
    cols = [values.get(c) for c in table.key]
    if len(cols) == 1:
        v = cols[0]
        return v if isinstance(v, list) else [v] * n
    return list(zip(*[v if isinstance(v, list) else repeat(v, n) for v in cols], strict=False))


class _Seen:
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


class _Batch:
    """Columns accumulated for one table, plus the offset ranges they came from.

    The deduplication token names the cluster and, per topic-partition, the offset range
    and the first message's timestamp: re-reading the same messages gives the same token,
    while a new broker or a recreated topic that reuses offsets does not.
    """

    def __init__(self, table: Table, cluster: str = "") -> None:
        self.table = table
        self.cluster = cluster
        self.names = [n for n, _ in table.columns] + [n for n, _ in _PROVENANCE]
        self.columns: list[_Column] = [_Column() for _ in self.names]
        self.ranges: dict[tuple[str, int], list[int]] = {}
        self.rows = 0

    def add(self, record: Record, topic: str, partition: int, offset: int, timestamp_ms: int = 0,
            seen: _Seen | None = None) -> int:
        """Append the record's rows (those whose key ``seen`` has not stored yet); returns how many."""
        n, values = _ROWS_OF_TOPIC.get(topic, self.table.rows)(record)
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
            if isinstance(v, list):
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
        types = dict([*self.table.columns, *_PROVENANCE])
        return pa.table([c.arrow(n, types[n]) for n, c in zip(self.names, self.columns, strict=True)], names=self.names)

    def token(self) -> str:
        ranges = ";".join(f"{t}:{p}:{a}-{b}@{ts}" for (t, p), (a, b, ts) in sorted(self.ranges.items()))
        return f"{self.table.name}|{self.cluster}|{ranges}"


_ARROW = {"String": pa.string(), "Float64": pa.float64(), "Int32": pa.int32(), "Int64": pa.int64(),
          "UInt16": pa.uint16(), "UInt64": pa.uint64(), "Bool": pa.bool_()}


def _arrow_type(typ: str) -> pa.DataType:
    if typ == "Map(String, Int64)":
        return pa.map_(pa.string(), pa.int64())
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
                or pa.types.is_map(t)):
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


class ClickHouseSink:
    """Kafka -> ClickHouse, one table per topic.

    Args:
        client: clickhouse-connect client (chDB or server), database selected.
        kafka_config: confluent-kafka settings (bootstrap, security).
        codec: decoder for every topic.
        group_id: consumer group (offsets committed after inserts).
        batch_rows, flush_s: flush when a table holds this many rows or this long passed.
        exactly_once: skip what is already stored (by offset after a crash, by natural key when
            re-sent); off only for the negative control of fault tests.
        dedup_keys: natural keys remembered per table (the window for re-sent events).
        crash_after_inserts, kill_during_insert: fault injection for tests (0 = off).
    """

    def __init__(self, client: Client, kafka_config: dict[str, str], codec: Codec, group_id: str = "labloop-sink",
                 batch_rows: int = 50_000, flush_s: float = 0.5, session_timeout_s: float = 6.0,
                 exactly_once: bool = True, dedup_keys: int = 1_000_000, crash_after_inserts: int = 0,
                 kill_during_insert: int = 0) -> None:
        self.client = client
        self.codec = codec
        self.lock = threading.Lock()  # chDB is shared with the HTTP bridge threads
        self.consumer = make_consumer(kafka_config, group_id, session_timeout_s)
        self.batch_rows, self.flush_s = batch_rows, flush_s
        import pandas  # noqa: F401 - clickhouse-connect imports it lazily on the first insert: pay that at start
        self.rows_inserted: dict[str, int] = defaultdict(int)
        self.skipped = 0
        self.already_stored = 0  # messages re-read after a restart whose rows were already in ClickHouse
        self.exactly_once = exactly_once
        self.seen = _Seen(dedup_keys) if exactly_once else None
        self.crash_after_inserts = crash_after_inserts  # fault injection: exit between an insert and its commit
        self.kill_during_insert = kill_during_insert  # fault injection: SIGKILL while this insert runs
        self._inserts = 0
        self._cluster = ""
        self._stored: dict[tuple[str, str, int], int] = {}  # (table, topic, partition) -> last offset stored
        self.last_flush_at = 0.0  # perf_counter() after the last insert was acknowledged
        self.assigned_at = 0.0  # perf_counter() when the group gave this sink its partitions
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self, idle_exit_s: float | None = None) -> None:
        """Consume until :meth:`stop` (or ``idle_exit_s`` without messages)."""
        cluster = self._cluster = self.consumer.list_topics(timeout=30).cluster_id or ""
        self.consumer.subscribe([t.name for t in TOPICS.values()], on_assign=self._on_assign)
        batches: dict[str, _Batch] = {}
        offsets: dict[tuple[str, int], int] = {}
        last_flush = last_msg = time.monotonic()
        assigned = False
        try:
            while not self._stop.is_set():
                msgs = self.consumer.consume(10_000, 0.2)
                if not assigned and self.consumer.assignment():
                    assigned, last_msg = True, time.monotonic()  # idle time counts from the join
                    self.assigned_at = time.perf_counter()
                for m in msgs:
                    if m.error():
                        log.warning("consumer error: %s", m.error())
                        continue
                    last_msg = time.monotonic()
                    topic, part, off = str(m.topic()), int(m.partition() or 0), int(m.offset() or 0)
                    offsets[(topic, part)] = off + 1
                    table = _TABLE_OF_TOPIC.get(topic)
                    if table is None:
                        continue
                    if self.exactly_once and off <= self._stored.get((table.name, topic, part), -1):
                        self.already_stored += 1  # inserted before a crash, its offset not yet committed
                        continue
                    try:
                        rec = self.codec.decode(m.value() or b"", expect=_SCHEMAS_OF_TOPIC[topic]).record
                    except DecodeError as exc:
                        # The worker dead-letters its inputs; the sink only records that it skipped.
                        self.skipped += 1
                        log.warning("skipped %s[%d]@%d: %s", topic, part, off, exc)
                        continue
                    ts = m.timestamp()[1]
                    batch = batches.setdefault(table.name, _Batch(table, cluster))
                    batch.add(rec, topic, part, off, ts, self.seen)
                    if batch.size >= self.batch_rows:
                        # One poll can hold 10,000 plates; flushing here keeps every insert below
                        # ClickHouse's max_insert_block_size, so it lands as one block (all or nothing),
                        # which is what resuming after the largest stored offset relies on.
                        self._flush(batches, offsets)
                        batches, offsets, last_flush = {}, {}, time.monotonic()
                now = time.monotonic()
                if offsets and now - last_flush >= self.flush_s:
                    self._flush(batches, offsets)
                    batches, offsets, last_flush = {}, {}, now
                if idle_exit_s is not None and assigned and now - last_msg > idle_exit_s:
                    break
            if offsets:
                self._flush(batches, offsets)
        finally:
            self.consumer.close()

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Before reading newly assigned partitions: what of them is already in ClickHouse?

        Each insert holds a contiguous offset range per topic-partition and lands whole, so
        the largest ``_offset`` stored per table, topic and partition (of this cluster) is
        exactly where a restarted or rebalanced sink must resume inserting: offsets are
        committed only after the insert, and a crash in between re-reads rows already stored.
        """
        log.debug("assigned %d partition(s); loading what is already stored", len(partitions))
        if self.exactly_once:
            with self.lock:
                for t in TABLES.values():
                    rows = self.client.query(f"SELECT _topic, _partition, max(_offset) FROM {t.name} "
                                             f"WHERE _cluster = {{c:String}} GROUP BY _topic, _partition",
                                             parameters={"c": self._cluster}).result_rows
                    for topic, part, off in rows:
                        self._stored[(t.name, topic, int(part))] = int(off)
                    if self.seen is not None and t.key:
                        self._load_keys(t)
        consumer.assign(partitions)  # a callback that does not assign leaves the consumer with nothing

    def _load_keys(self, t: Table) -> None:
        """Remember the natural keys this cluster's rows already hold (the latest ``cap`` of them)."""
        assert self.seen is not None
        types = dict(t.columns)
        cols = [f"toUnixTimestamp64Milli(`{c}`)" if types[c].startswith("DateTime64") else f"`{c}`" for c in t.key]
        rows = self.client.query(f"SELECT {', '.join(cols)} FROM {t.name} WHERE _cluster = {{c:String}} "
                                 f"ORDER BY _offset DESC LIMIT {self.seen.cap}", parameters={"c": self._cluster}).result_rows
        self.seen.add(t.name, (r[0] for r in rows) if len(cols) == 1 else (tuple(r) for r in rows))

    def _flush(self, batches: dict[str, _Batch], offsets: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import TopicPartition

        for b in batches.values():
            if not b.size:
                continue
            table = b.arrow()
            # The control mode must defeat ClickHouse's own block-hash deduplication too, or a fault test
            # without exactly-once could not see the duplicates it is meant to detect. Measured here:
            # chDB still drops an identical block sent with insert_deduplicate=0; a fresh token does not.
            token = b.token() if self.exactly_once else uuid.uuid4().hex
            settings: dict[str, Any] = {"insert_deduplication_token": token}
            self._inserts += 1
            if self.kill_during_insert and self._inserts == self.kill_during_insert:
                log.error("fault injection: SIGKILL during insert %d", self._inserts)
                threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
            try:
                with self.lock:
                    self.client.insert_arrow(b.table.name, table, settings=settings)
            except ClickHouseError as exc:
                raise SinkError(f"insert into {b.table.name} failed: {exc}") from exc
            self.rows_inserted[b.table.name] += b.size
            if self.crash_after_inserts and self._inserts >= self.crash_after_inserts:
                log.error("fault injection: exiting after insert %d, before committing its offsets", self._inserts)
                os._exit(17)
        self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
        self.last_flush_at = time.perf_counter()


_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_SKIP_PARAMS = {"query", "database", "default_format", "query_id", "session_id", "session_timeout", "user",
                "password", "compress", "decompress", "enable_http_compression", "wait_end_of_query", "send_progress_in_http_headers",
                "http_headers_progress_interval_ms", "session_check", "client_protocol_version", "output_format_arrow_string_as_string"}


class HttpBridge:
    """Answer ClickHouse's HTTP interface from the chDB engine this process owns.

    Queries only (``SELECT``, ``SHOW``, ``DESCRIBE``, DDL, ``INSERT ... SELECT``);
    an insert with a data body is refused with HTTP 501. Listens on 127.0.0.1 only.
    """

    def __init__(self, client: Client, lock: threading.Lock, port: int, database: str) -> None:
        self.client, self.lock, self.port, self.database = client, lock, port, database
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._handle(b"")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._handle(self.rfile.read(length) if length else b"")

            def _handle(self, body: bytes) -> None:
                url = urlparse(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                if url.path in ("/ping", "/"):
                    if "query" not in params and not body:
                        return self._send(200, b"Ok.\n", "text/plain")
                sql = params.get("query", "")
                if body:
                    if sql and sql.lstrip().upper().startswith("INSERT"):
                        return self._send(501, b"Code: 48. labloop's chDB bridge does not accept INSERT data bodies\n",
                                          "text/plain")
                    sql = (sql + " " + body.decode()).strip() if sql else body.decode()
                status, out, fmt = bridge.execute(sql, params)
                self._send(status, out, "text/plain; charset=UTF-8" if status != 200 else "application/octet-stream",
                           fmt)

            def _send(self, status: int, out: bytes, ctype: str, fmt: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.send_header("X-ClickHouse-Server-Display-Name", "labloop-chdb")
                self.send_header("X-ClickHouse-Timezone", "UTC")
                self.send_header("X-ClickHouse-Summary", '{"read_rows":"0","written_rows":"0"}')
                if fmt:
                    self.send_header("X-ClickHouse-Format", fmt)
                if status != 200:
                    self.send_header("X-ClickHouse-Exception-Code", "1")
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="labloop-http-bridge", daemon=True)

    def execute(self, sql: str, params: dict[str, str]) -> tuple[int, bytes, str | None]:
        sql = sql.strip().rstrip(";")
        m = _FORMAT_RE.search(sql)
        fmt = m.group(1) if m else params.get("default_format", "TabSeparated")
        if m:
            sql = sql[: m.start()].rstrip()
        settings = {k: v for k, v in params.items() if k not in _SKIP_PARAMS}
        db = params.get("database") or self.database
        try:
            with self.lock:
                prev = self.client.database
                self.client.database = db
                try:
                    out = self.client.raw_query(sql, fmt=fmt, settings=settings or None)
                finally:
                    self.client.database = prev
        except Exception as exc:  # any engine error goes back to the HTTP client, as ClickHouse does
            return 500, f"Code: 1. {exc}\n".encode(), None
        return 200, out, fmt

    def start(self) -> HttpBridge:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

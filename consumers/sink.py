"""The ClickHouse sink: every topic into its table, exactly once.

The sink consumes all catalogue topics, turns events into columns, inserts one columnar batch
per table, and commits Kafka offsets only after ClickHouse acknowledged the insert
(at-least-once). Each insert holds a contiguous offset range per topic-partition and lands
whole, and carries a deterministic ``insert_deduplication_token`` built from those ranges, so
re-reading the same range after a crash inserts nothing twice. Events re-sent with new offsets
(an instrument re-publishing a reading, a worker re-emitting after a crash) are dropped by
natural key (:class:`~labloop.consumers.columns.Seen`).

Fault injection is not a setting: a caller (a test, ``labloop bench faults``) passes
``on_insert``, called before each insert and after it, before its offsets are committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from labloop.consumers.columns import Batch, Seen
from labloop.consumers.errors import SinkError
from labloop.consumers.health import Rate
from labloop.consumers.kafka import make_consumer
from labloop.consumers.plates import PLATE_CANONICAL, PlatePositions, decode_plate, warm_up
from labloop.consumers.tables import SCHEMAS_OF_TOPIC, TABLE_OF_TOPIC, TABLES, Table
from labloop.schemas import TOPICS, Codec, DecodeError

__all__ = ["ClickHouseSink", "InsertHook"]

log = logging.getLogger("labloop.sink")

InsertHook = Callable[[int, str], None]  # (insert number from 1, "before" | "after"): fault injection

class SinkMetrics(Collector):
    """The sink's Prometheus metrics: ``labloop_sink_rows_total{table}``,
    ``labloop_sink_rows_per_second``, ``labloop_sink_insert_seconds`` (histogram),
    ``labloop_sink_duplicates_total`` (rows not stored again: by natural key, or by offset after a
    restart) and ``labloop_consumer_lag{topic,partition}``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.insert = Histogram("labloop_sink_insert_seconds", "one ClickHouse insert, acknowledged",
                                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                                registry=self.registry)
        self.registry.register(self)
        self.rows: dict[str, int] = {}
        self.dropped = 0
        self.lag: dict[tuple[str, int], int] = {}
        self.assigned = 0
        self.rate = Rate()

    def set(self, rows: dict[str, int], dropped: int, lag: dict[tuple[str, int], int], assigned: int) -> None:
        self.rate.update(sum(rows.values()))
        self.rows, self.dropped, self.lag, self.assigned = rows, dropped, lag, assigned

    def collect(self) -> Iterator[Any]:
        rows = CounterMetricFamily("labloop_sink_rows", "rows inserted into ClickHouse", labels=["table"])
        for t, n in sorted(self.rows.items()):
            rows.add_metric([t], n)
        yield rows
        yield GaugeMetricFamily("labloop_sink_rows_per_second", "rows inserted per second, lately", value=self.rate.value)
        yield CounterMetricFamily("labloop_sink_duplicates", "rows not stored because they already were",
                                  value=self.dropped)
        lag = GaugeMetricFamily("labloop_consumer_lag", "messages behind the high watermark", labels=["topic", "partition"])
        for (topic, part), n in sorted(self.lag.items()):
            lag.add_metric([topic, str(part)], n)
        yield lag


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
        on_insert: called with the insert's number and ``"before"`` / ``"after"`` around each
            insert (after: acknowledged, offsets not yet committed); fault injection for tests.
    """

    def __init__(self, client: Client, kafka_config: dict[str, str], codec: Codec, group_id: str = "labloop-sink",
                 batch_rows: int = 50_000, flush_s: float = 0.5, session_timeout_s: float = 6.0,
                 exactly_once: bool = True, dedup_keys: int = 1_000_000, on_insert: InsertHook | None = None,
                 replicated: bool = False) -> None:
        self.client = client
        # On Replicated tables an insert returns once a quorum of replicas has it, and the offset
        # read-back asks for sequential consistency: a lagging replica cannot answer "not stored
        # yet" for rows the sink already inserted (which would store them twice).
        self._insert_settings: dict[str, Any] = {"insert_quorum": "auto", "insert_quorum_parallel": 0} if replicated else {}
        self._read_settings: dict[str, Any] = {"select_sequential_consistency": 1} if replicated else {}
        self.codec = codec
        self.lock = threading.Lock()  # chDB is shared with the HTTP bridge threads
        self.consumer = make_consumer(kafka_config, group_id, session_timeout_s)
        self.batch_rows, self.flush_s = batch_rows, flush_s
        import pandas  # noqa: F401 - clickhouse-connect imports it lazily on the first insert: pay that at start
        self.rows_inserted: dict[str, int] = defaultdict(int)
        self.skipped = 0
        self.already_stored = 0  # messages re-read after a restart whose rows were already in ClickHouse
        self.exactly_once = exactly_once
        self.seen = Seen(dedup_keys) if exactly_once else None
        self.on_insert = on_insert
        self._inserts = 0
        self._cluster = ""
        self._stored: dict[tuple[str, str, int], int] = {}  # (table, topic, partition) -> last offset stored
        self.last_flush_at = 0.0  # perf_counter() after the last insert was acknowledged
        self.assigned_at = 0.0  # perf_counter() when the group gave this sink its partitions
        self._stop = threading.Event()
        self.metrics = SinkMetrics()
        self._observed_at = 0.0
        self.on_tick: Callable[[], None] | None = None  # called every ~2 s from the loop (a health check's tick)
        # One flush in flight on a thread while the loop reads on: chDB and pyarrow release the
        # interpreter lock, so inserting overlaps decoding. Its offsets are committed by the loop
        # once it is acknowledged, and the next flush waits for it: inserts land in offset order.
        self._inserter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-sink-insert")
        self._inflight: tuple[Future[dict[str, int]], dict[tuple[str, int], int]] | None = None
        self._plates_topic = TOPICS["plates"].name
        warm_up()

    def stop(self) -> None:
        self._stop.set()

    def run(self, idle_exit_s: float | None = None) -> None:
        """Consume until :meth:`stop` (or ``idle_exit_s`` without messages)."""
        cluster = self._cluster = self.consumer.list_topics(timeout=30).cluster_id or ""
        self.consumer.subscribe([t.name for t in TOPICS.values()], on_assign=self._on_assign)
        batches: dict[str, Batch] = {}
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
                    table = TABLE_OF_TOPIC.get(topic)
                    if table is None:
                        continue
                    if self.exactly_once and off <= self._stored.get((table.name, topic, part), -1):
                        self.already_stored += 1  # inserted before a crash, its offset not yet committed
                        continue
                    value = m.value() or b""
                    ts = m.timestamp()[1]
                    wells = self._plate(value) if topic == self._plates_topic else None
                    batch = batches.get(table.name)
                    if batch is None:
                        batch = batches[table.name] = Batch(table, cluster)
                    if wells is not None:
                        batch.add_plate(value, wells, topic, part, off, ts, self.seen)
                    else:
                        try:
                            rec = self.codec.decode(value, expect=SCHEMAS_OF_TOPIC[topic]).record
                        except DecodeError as exc:
                            # The worker dead-letters its inputs; the sink only records that it skipped.
                            self.skipped += 1
                            log.warning("skipped %s[%d]@%d: %s", topic, part, off, exc)
                            continue
                        batch.add(rec, topic, part, off, ts, self.seen)
                    if batch.size >= self.batch_rows:
                        # One poll can hold 10,000 plates; flushing here keeps every insert below
                        # ClickHouse's max_insert_block_size, so it lands as one block (all or nothing),
                        # which is what resuming after the largest stored offset relies on.
                        self._flush(batches, offsets)
                        batches, offsets, last_flush = {}, {}, time.monotonic()
                if self._inflight is not None and self._inflight[0].done():
                    self._settle()
                now = time.monotonic()
                if now - self._observed_at >= 2.0:
                    self._observe(now)
                if offsets and now - last_flush >= self.flush_s:
                    self._flush(batches, offsets)
                    batches, offsets, last_flush = {}, {}, now
                if idle_exit_s is not None and assigned and now - last_msg > idle_exit_s:
                    break
            if offsets:
                self._flush(batches, offsets)
            self._settle()
        finally:
            if self._inflight is not None:  # stopping on an error: never commit what may not be stored
                self._inflight[0].cancel()
                with contextlib.suppress(Exception):
                    self._inflight[0].result()
                self._inflight = None
            self._inserter.shutdown(wait=True)
            self.consumer.close()

    def _plate(self, value: bytes) -> PlatePositions | None:
        """A current-schema plate's wells, read without building a dict per well; None for
        anything else (an older writer, a corrupt body), which the codec then decodes or names."""
        try:
            name, canonical, start = self.codec.writer(value)
        except DecodeError:
            return None
        if name != "PlateReadout" or canonical != PLATE_CANONICAL:
            return None
        return decode_plate(value, start)

    def _observe(self, now: float) -> None:
        """Refresh what ``/metrics`` and ``/readyz`` report (on the sink's own thread)."""
        self._observed_at = now
        lag: dict[tuple[str, int], int] = {}
        parts = self.consumer.assignment()
        for tp, pos in zip(parts, self.consumer.position(parts) if parts else [], strict=False):
            low, high = self.consumer.get_watermark_offsets(tp, cached=True) or (-1, -1)
            if high >= 0 and pos.offset >= 0:
                lag[(tp.topic, tp.partition)] = max(0, high - pos.offset)
        dropped = (self.seen.dropped if self.seen is not None else 0) + self.already_stored
        self.metrics.set(dict(self.rows_inserted), dropped, lag, len(parts))
        if self.on_tick is not None:
            self.on_tick()

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        """Before reading newly assigned partitions: what of them is already in ClickHouse?

        Each insert holds a contiguous offset range per topic-partition and lands whole, so
        the largest ``_offset`` stored per table, topic and partition (of this cluster) is
        exactly where a restarted or rebalanced sink must resume inserting: offsets are
        committed only after the insert, and a crash in between re-reads rows already stored.
        """
        log.debug("assigned %d partition(s); loading what is already stored", len(partitions))
        self._settle(rebalancing=True)  # what is stored includes the insert in flight
        if self.exactly_once:
            with self.lock:
                for t in TABLES.values():
                    rows = self.client.query(f"SELECT _topic, _partition, max(_offset) FROM {t.name} "
                                             f"WHERE _cluster = {{c:String}} GROUP BY _topic, _partition",
                                             parameters={"c": self._cluster}, settings=self._read_settings).result_rows
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
                                 f"ORDER BY _offset DESC LIMIT {self.seen.cap}", parameters={"c": self._cluster},
                                 settings=self._read_settings).result_rows
        self.seen.add(t.name, (r[0] for r in rows) if len(cols) == 1 else (tuple(r) for r in rows))

    def _flush(self, batches: dict[str, Batch], offsets: dict[tuple[str, int], int]) -> None:
        """Hand the batches to the inserter thread, after the flush before them has landed."""
        self._settle()
        self._inflight = (self._inserter.submit(self._insert, batches), offsets)

    def _settle(self, rebalancing: bool = False) -> None:
        """Wait for the flush in flight, then commit its offsets (raises what its insert raised).

        ``rebalancing``: called from an assignment, when the group may refuse the commit of
        partitions it just moved; the rows are stored either way, and the stored offsets read
        back next tell this sink (or the new owner) where to resume."""
        from confluent_kafka import KafkaException, TopicPartition

        if self._inflight is None:
            return
        job, offsets = self._inflight
        rows = job.result()
        self._inflight = None
        for table, n in rows.items():  # counted here, on the loop's thread, which also reads them
            self.rows_inserted[table] += n
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            if not rebalancing:
                raise
            log.warning("offsets of the last insert not committed during a rebalance (%s); its rows are stored", exc)
        self.last_flush_at = time.perf_counter()

    def _insert(self, batches: dict[str, Batch]) -> dict[str, int]:
        """On the inserter thread: each table's batch as one insert; returns rows per table."""
        rows: dict[str, int] = {}
        for b in batches.values():
            if not b.size:
                continue
            table = b.arrow()
            # The control mode must defeat ClickHouse's own block-hash deduplication too, or a fault test
            # without exactly-once could not see the duplicates it is meant to detect. Measured here:
            # chDB still drops an identical block sent with insert_deduplicate=0; a fresh token does not.
            token = b.token() if self.exactly_once else uuid.uuid4().hex
            settings: dict[str, Any] = {"insert_deduplication_token": token, **self._insert_settings}
            self._inserts += 1
            if self.on_insert is not None:
                self.on_insert(self._inserts, "before")
            t0 = time.perf_counter()
            try:
                with self.lock:
                    self.client.insert_arrow(b.table.name, table, settings=settings)
            except ClickHouseError as exc:
                raise SinkError(f"insert into {b.table.name} failed: {exc}") from exc
            self.metrics.insert.observe(time.perf_counter() - t0)
            rows[b.table.name] = b.size
            if self.on_insert is not None:
                self.on_insert(self._inserts, "after")
        return rows



"""The ClickHouse table catalogue and its DDL: one table per topic, the columns each event becomes.

Every table also has the provenance columns ``_cluster``, ``_topic``, ``_partition`` and
``_offset``: where each row came from. ``Table.key`` names the natural key of a table's rows,
by which the sink drops events re-sent at a new offset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from labloop.consumers.errors import SinkError
from labloop.schemas import TOPICS
from labloop.schemas.types import Record

__all__ = ["redact", "sql_string", "ONE_ROW", "PROVENANCE", "QUALIFIERS", "ROWS_OF_TOPIC", "SCHEMAS_OF_TOPIC", "TABLES", "TABLE_OF_TOPIC", "Columns", "Table", "connect", "table_ddl",
           "create_tables"]

_QUAL = {"EQ": "=", "LT": "<", "GT": ">"}
QUALIFIERS = list(_QUAL.values())  # the column's values, in the Qualifier enum's symbol order
PROVENANCE = [("_cluster", "LowCardinality(String)"), ("_topic", "LowCardinality(String)"), ("_partition", "UInt16"),
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
    ttl_s: int = 0  # rows older than this (by event_time) are dropped; 0 = kept


def _ttl(t: Table) -> str:
    return f"toDateTime(event_time) + INTERVAL {t.ttl_s} SECOND"


# A columnizer turns one event into ``(n_rows, columns)``: each column a list of n values,
# or one value shared by all n rows (a plate's campaign, say). Building columns with one
# comprehension each, instead of a dict per row, is what lets the sink keep up with plates.
Columns = tuple[int, dict[str, Any]]


def _same(r: Record) -> Columns:
    return 1, r


def _campaign(r: Record) -> Columns:
    """The further objectives as JSON text: ``[{"assay_id", "unit", "goal", "bound", "weight"}, ...]``."""
    return 1, {**r, "objectives": json.dumps(r.get("objectives") or [])}


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
_REQUEST_COLUMNS = [("request_id", S), ("campaign_id", S), ("compound_id", S), ("smiles", S), ("assay_id", LS),
                    ("assays", "Array(String)"),
                    ("priority", "Int32"), ("sequence", "Int64"), ("batch", "Int32"), ("policy", LS),
                    ("acquisition_score", "Nullable(Float64)"), ("predicted_mean", "Nullable(Float64)"),
                    ("predicted_std", "Nullable(Float64)"), ("model_version", "Int64"),
                    ("trained_on", "Map(String, Int64)"), ("event_time", TS), ("expires_at", TS)]
TABLES: dict[str, Table] = {t.name: t for t in (
    Table("campaigns", [("campaign_id", S), ("objective_assay_id", LS), ("direction", LS), ("unit", LS),
                        ("batch_size", "Int32"), ("init_size", "Int32"), ("budget", "Int32"), ("min_pool_size", "Int64"),
                        ("policy", LS), ("learner", LS), ("schedule", LS), ("request_ttl_s", "Float64"),
                        ("seed", "Int64"), ("objectives", S), ("approval", "Bool"), ("event_time", TS)],
          "(campaign_id, event_time)", _campaign, ("campaign_id", "event_time")),
    Table("compounds", [("campaign_id", S), ("compound_id", S), ("smiles", S), ("source", LS), ("event_time", TS),
                        ("ingest_time", TS)], "(campaign_id, compound_id)", _same, ("campaign_id", "compound_id")),
    Table("readings", [("reading_id", S), ("campaign_id", S), ("compound_id", S), ("assay_id", LS),
                       ("value", "Float64"), ("unit", LS), ("qualifier", LS), ("request_id", "Nullable(String)"),
                       ("instrument_id", LS), ("plate_id", "Nullable(String)"), ("well", "Nullable(String)"),
                       ("event_time", TS), ("ingest_time", TS)], "(campaign_id, assay_id, compound_id, event_time)", _reading,
          ("reading_id",)),
    Table("predictions", [("campaign_id", S), ("model_version", "Int64"), ("assay_id", LS), ("compound_id", S),
                          ("mean", "Float64"), ("std", "Float64"), ("event_time", TS)],
          "(campaign_id, model_version, compound_id)", _prediction,  # derived, and versions are never reused: no key
          ttl_s=TOPICS["predictions"].retention_ms // 1000),  # what the topic keeps: a whole pool per model version
    Table("requests", _REQUEST_COLUMNS, "(campaign_id, sequence)", _same, ("request_id",)),
    # What approval-gated campaigns proposed; `requests` holds those approved.
    Table("proposals", _REQUEST_COLUMNS, "(campaign_id, sequence)", _same, ("request_id",)),
    Table("decisions", [("decision_id", S), ("campaign_id", S), ("request_id", S), ("action", LS),
                        ("priority", "Nullable(Int32)"), ("reason", "Nullable(String)"), ("decided_by", S),
                        ("event_time", TS)], "(campaign_id, request_id, event_time)", _same, ("decision_id",)),
    Table("request_status", [("request_id", S), ("campaign_id", S), ("compound_id", S), ("status", LS),
                             ("robot_id", LS), ("reason", "Nullable(String)"), ("event_time", TS)],
          "(campaign_id, request_id, event_time)", _same, ("request_id", "status")),
    Table("model_updates", [("campaign_id", S), ("model_version", "Int64"), ("learner", LS), ("device", LS),
                            ("n_train", "Int64"), ("n_new", "Int64"), ("n_measured", "Int64"), ("n_failed", "Int64"),
                            ("n_pending", "Int64"), ("n_requested", "Int64"), ("pool_size", "Int64"),
                            ("best_value", "Nullable(Float64)"), ("train_s", "Float64"), ("done", "Bool"), ("n_readings", "Int64"),
                            ("trained_on", "Map(String, Int64)"), ("live_n", "Int64"), ("live_rmse", "Nullable(Float64)"),
                            ("live_nll", "Nullable(Float64)"), ("live_coverage90", "Nullable(Float64)"),
                            ("live_spearman", "Nullable(Float64)"), ("event_time", TS)], "(campaign_id, model_version, event_time)", _same,
          ("campaign_id", "model_version", "done")),
    Table("dead_letters", [("source_topic", LS), ("source_partition", "Int32"), ("source_offset", "Int64"),
                           ("source_key", "Nullable(String)"), ("stage", LS), ("service", LS), ("error_class", LS),
                           ("error_message", S), ("raw", S), ("rejected_ids", "Array(String)"), ("event_time", TS)],
          "(source_topic, source_partition, source_offset)", _same,
          ("source_topic", "source_partition", "source_offset", "error_message")),
)}
TABLE_OF_TOPIC = {t.name: TABLES[t.table] for t in TOPICS.values()}
SCHEMAS_OF_TOPIC = {t.name: t.schemas for t in TOPICS.values()}
#: The columnizers whose events are always one row, their values scalars (or one row's array).
ONE_ROW: frozenset[Callable[[Record], Columns]] = frozenset({_same, _campaign, _reading})
# Topics whose events become rows differently from their table's default (plates -> one row per well).
ROWS_OF_TOPIC: dict[str, Callable[[Record], Columns]] = {TOPICS["plates"].name: _plate}


#: Analysts' views (created with the tables, replaced when labloop changes them).
VIEWS: dict[str, str] = {
    # The newest model's prediction for every compound of every campaign, per assay (a campaign's
    # further objectives and constraints are predicted too).
    "latest_predictions": (
        "SELECT campaign_id, assay_id, compound_id, v AS model_version, m AS mean, sd AS std FROM ("
        "SELECT campaign_id, assay_id, compound_id, max(model_version) AS v, argMax(mean, model_version) AS m, "
        "argMax(std, model_version) AS sd FROM predictions GROUP BY campaign_id, assay_id, compound_id)"),
    # Each request, when it was made, accepted, started and finished, and how it ended (NULL: not yet).
    "request_lifecycle": (
        "SELECT q.campaign_id AS campaign_id, q.request_id AS request_id, q.compound_id AS compound_id, "
        "q.event_time AS requested_at, s.accepted_at, s.started_at, s.finished_at, s.last_status "
        "FROM requests AS q LEFT JOIN (SELECT request_id, "
        "nullIf(minIf(event_time, status = 'ACCEPTED'), toDateTime64(0, 3, 'UTC')) AS accepted_at, "
        "nullIf(minIf(event_time, status = 'STARTED'), toDateTime64(0, 3, 'UTC')) AS started_at, "
        "nullIf(minIf(event_time, status IN ('COMPLETED', 'FAILED', 'EXPIRED')), toDateTime64(0, 3, 'UTC')) AS finished_at, "
        "argMax(status, event_time) AS last_status FROM request_status GROUP BY request_id) AS s "
        "ON q.request_id = s.request_id"),
    # Every campaign: budget, requests issued and still open, the latest model's counts, best value,
    # version, live quality and whether it is done (what `labloop status` shows).
    "campaign_progress": (
        "SELECT c.campaign_id AS campaign_id, c.budget AS budget, ifNull(r.req, 0) AS requested, "
        "ifNull(r.req - r.closed, 0) AS in_flight, ifNull(m.meas, 0) AS measured, m.best AS best_value, "
        "m.ver AS model_version, m.rmse AS live_rmse, m.cover AS live_coverage90, ifNull(m.live, 0) AS live_n, "
        "ifNull(m.fin, false) AS done "
        "FROM (SELECT campaign_id, argMax(budget, event_time) AS budget FROM campaigns GROUP BY campaign_id) AS c "
        # A request is closed as the worker sees it: FAILED or EXPIRED, or an accepted reading of every
        # assay it names (a robot's COMPLETED with a result rejected or still to come leaves it in flight).
        "LEFT JOIN (SELECT q.campaign_id AS campaign_id, count() AS req, "
        "countIf(st.gave_up OR hasAll(a.got, q.named)) AS closed "
        "FROM (SELECT campaign_id, request_id, any(if(empty(assays), [toString(assay_id)], assays)) AS named "
        "FROM requests GROUP BY campaign_id, request_id) AS q "
        "LEFT JOIN (SELECT request_id, max(status IN ('FAILED', 'EXPIRED')) AS gave_up FROM request_status "
        "GROUP BY request_id) AS st ON q.request_id = st.request_id "
        "LEFT JOIN (SELECT assumeNotNull(request_id) AS request_id, groupUniqArray(toString(assay_id)) AS got "
        "FROM accepted_readings WHERE request_id IS NOT NULL GROUP BY request_id) AS a ON q.request_id = a.request_id "
        "GROUP BY q.campaign_id) AS r "
        "ON c.campaign_id = r.campaign_id "
        "LEFT JOIN (SELECT campaign_id, argMax(n_measured, k) AS meas, argMax(best_value, k) AS best, "
        "max(model_version) AS ver, argMax(live_rmse, k) AS rmse, argMax(live_coverage90, k) AS cover, "
        "argMax(live_n, k) AS live, max(done) AS fin "
        "FROM (SELECT *, (model_version, done, event_time) AS k FROM model_updates) GROUP BY campaign_id) AS m "
        "ON c.campaign_id = m.campaign_id"),
}


def sql_string(s: str) -> str:
    """``s`` as a ClickHouse string literal.

    >>> sql_string("it's")
    "'it\\\\'s'"
    """
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for banners, errors and logs).

    >>> redact("https://labloop:s3cret@ch.example:8443/db")
    'https://labloop:***@ch.example:8443/db'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(dsn: str, database: str | None = None) -> Client:
    """A clickhouse-connect client for ``chdb:///path`` (in-process) or ``http(s)://...``.

    ``https://`` always means TLS, whatever the port (clickhouse-connect alone picks TLS by port:
    8443 and 443, and sent Basic credentials in clear to any other).

    Raises:
        SinkError: it cannot connect; the message never holds the password.
    """
    try:
        client = clickhouse_connect.get_client(dsn=dsn, secure=True) if dsn.lower().startswith("https://") \
            else clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:  # clickhouse-connect raises several unrelated types on connect
        password = urlsplit(dsn).password
        why = str(exc).replace(password, "***") if password else str(exc)
        raise SinkError(f"cannot connect to ClickHouse at {redact(dsn)}: {why}") from None
    if database:
        client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        client.database = database
    return client


def table_ddl(t: Table, dedup_window: int = 10_000, cluster: str | None = None) -> str:
    """``CREATE TABLE`` for ``t``: a MergeTree on one server, or with ``cluster`` a
    ReplicatedMergeTree created ``ON CLUSTER`` (the Keeper path and replica from the server's
    ``{shard}`` / ``{replica}`` macros), each deduplicating the last ``dedup_window`` insert tokens."""
    cols = [*t.columns, *PROVENANCE]
    ttl = f"TTL {_ttl(t)} " if t.ttl_s else ""
    body = f"({', '.join(f'`{n}` {typ}' for n, typ in cols)})"
    if cluster is None:
        return (f"CREATE TABLE IF NOT EXISTS {t.name} {body} ENGINE = MergeTree ORDER BY {t.order_by} {ttl}"
                f"SETTINGS non_replicated_deduplication_window = {dedup_window}")
    return (f"CREATE TABLE IF NOT EXISTS {t.name} ON CLUSTER `{cluster}` {body} ENGINE = ReplicatedMergeTree("
            f"'/clickhouse/tables/{{shard}}/{{database}}/{t.name}', '{{replica}}') ORDER BY {t.order_by} {ttl}"
            f"SETTINGS replicated_deduplication_window = {dedup_window}")


def create_tables(client: Client, dedup_window: int = 10_000, cluster: str | None = None) -> None:
    """Create every missing table and add columns that newer schemas introduced (idempotent);
    ``cluster``: Replicated tables and views ``ON CLUSTER`` (:func:`table_ddl`)."""
    on = f" ON CLUSTER `{cluster}`" if cluster else ""
    for t in TABLES.values():
        cols = [*t.columns, *PROVENANCE]
        client.command(table_ddl(t, dedup_window, cluster))
        existing = {r[0] for r in client.query(f"SELECT name FROM system.columns WHERE database = currentDatabase() "
                                                f"AND table = '{t.name}'").result_rows}
        for n, typ in cols:
            if n not in existing:
                client.command(f"ALTER TABLE {t.name}{on} ADD COLUMN IF NOT EXISTS `{n}` {typ}")
        if t.ttl_s:  # a table made before the TTL existed gets it too
            client.command(f"ALTER TABLE {t.name}{on} MODIFY TTL {_ttl(t)}")
    # What the loop accepted: readings minus those its worker dead-lettered (wrong unit, unknown
    # compound or request, out of range...). A rejected row is matched by its own message and id, so
    # the same id sent again, correctly, counts. Before VIEWS: campaign_progress reads it.
    client.command(
        f"CREATE VIEW IF NOT EXISTS accepted_readings{on} AS SELECT * FROM readings "
        "WHERE (_topic, _partition, _offset, reading_id) NOT IN ("
        "SELECT source_topic, toUInt16(source_partition), toUInt64(source_offset), arrayJoin(rejected_ids) "
        "FROM dead_letters)")
    for name, sql in VIEWS.items():
        client.command(f"CREATE OR REPLACE VIEW {name}{on} AS {sql}")



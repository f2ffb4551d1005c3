"""Operators' and analysts' tools over ClickHouse: dead letters and why a request was made."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from labloop.consumers.approval import decisions_of
from labloop.consumers.tables import sql_string as _q
from labloop.schemas import Codec, DecodeError, LabloopError

__all__ = ["DeadLetterRef", "NotFound", "dead_letters", "explain", "replay", "request_state"]


class NotFound(LabloopError):
    """No row matches what was asked for."""


@dataclass(frozen=True)
class DeadLetterRef:
    """Where a dead letter came from: ``topic:partition:offset``."""

    topic: str
    partition: int
    offset: int

    @classmethod
    def parse(cls, text: str) -> DeadLetterRef:
        try:
            topic, part, off = text.rsplit(":", 2)
            return cls(topic, int(part), int(off))
        except ValueError:
            raise NotFound(f"{text!r} is not topic:partition:offset") from None

    def sql(self) -> str:
        return (f"source_topic = {_q(self.topic)} AND source_partition = {self.partition} "
                f"AND source_offset = {self.offset}")


def _where(topic: str | None, error_class: str | None, refs: list[DeadLetterRef]) -> str:
    cond = ["1"]
    if topic:
        cond.append(f"source_topic = {_q(topic)}")
    if error_class:
        cond.append(f"error_class = {_q(error_class)}")
    if refs:
        cond.append("(" + " OR ".join(f"({r.sql()})" for r in refs) + ")")
    return " AND ".join(cond)


def dead_letters(client: Client, topic: str | None = None, error_class: str | None = None,
                 limit: int = 50) -> tuple[list[str], list[Sequence[Any]]]:
    """Newest dead letters first: provenance, stage, error."""
    res = client.query(
        "SELECT concat(source_topic, ':', toString(source_partition), ':', toString(source_offset)) AS source, "
        "stage, service, error_class, substring(error_message, 1, 120) AS error, event_time "
        f"FROM dead_letters WHERE {_where(topic, error_class, [])} ORDER BY event_time DESC LIMIT {int(limit)}")
    return list(res.column_names), list(res.result_rows)


def show(client: Client, codec: Codec, ref: DeadLetterRef) -> dict[str, Any]:
    """Every dead letter of one source message, with its raw bytes decoded when they decode."""
    # Bytes travel as hex: a String column of arbitrary bytes does not survive a UTF-8 decode.
    rows = client.query(f"SELECT stage, service, error_class, error_message, source_key, hex(raw), event_time "
                        f"FROM dead_letters WHERE {ref.sql()} ORDER BY event_time").result_rows
    if not rows:
        raise NotFound(f"no dead letter from {ref.topic}:{ref.partition}:{ref.offset}")
    raw = bytes.fromhex(rows[0][5])
    try:
        d = codec.decode(raw)
        decoded: Any = {"schema": d.name, "framing": d.framing, "record": d.record}
    except DecodeError as exc:
        decoded = f"does not decode: {exc.__class__.__name__}: {exc}"
    return {"source": f"{ref.topic}:{ref.partition}:{ref.offset}", "key": rows[0][4], "bytes": len(raw),
            "raw_hex": raw[:64].hex(), "decoded": decoded,
            "errors": [{"stage": r[0], "service": r[1], "error_class": r[2], "error": r[3], "at": str(r[6])}
                       for r in rows]}


def replay(client: Client, producer: Producer, topic: str | None = None, error_class: str | None = None,
           refs: list[DeadLetterRef] | None = None, dry_run: bool = False) -> list[DeadLetterRef]:
    """Re-publish the original bytes of matching dead letters to their source topics, once per message.

    Consumers are idempotent (readings by ``reading_id``), so replaying a plate whose good
    wells were applied the first time applies only what failed.
    """
    rows = client.query(
        "SELECT source_topic, source_partition, source_offset, hex(any(source_key)), hex(any(raw)) FROM dead_letters "
        f"WHERE {_where(topic, error_class, refs or [])} "
        "GROUP BY source_topic, source_partition, source_offset ORDER BY source_topic, source_partition, source_offset"
    ).result_rows
    done = []
    for t, p, o, key, raw in rows:
        if not dry_run:
            producer.produce(t, key=bytes.fromhex(key) if key else None, value=bytes.fromhex(raw))
        done.append(DeadLetterRef(t, int(p), int(o)))
    if not dry_run:
        left = producer.flush(30)
        if left:
            raise LabloopError(f"{left} replayed messages were not acknowledged")
    return done


def request_state(client: Client, request_id: str) -> dict[str, Any] | None:
    """A request's campaign, compound, status (its latest ending if it has one, else its latest
    status, ``REQUESTED`` when none came) and whether an accepted reading names it
    (``has_result``), or None when ClickHouse has no such request."""
    res = client.query(f"SELECT campaign_id, compound_id FROM requests WHERE request_id = {_q(request_id)} LIMIT 1")
    if not res.result_rows:
        return None
    cid, compound = res.result_rows[0]
    # The latest ending (COMPLETED, FAILED, EXPIRED) wins over any other status: a robot reports
    # ACCEPTED, STARTED and COMPLETED within the same millisecond, and a late one after an expiry.
    st = client.query(f"SELECT status FROM request_status WHERE request_id = {_q(request_id)} "
                      f"ORDER BY status IN ('COMPLETED', 'FAILED', 'EXPIRED') DESC, event_time DESC LIMIT 1").result_rows
    got = client.query(f"SELECT count() FROM accepted_readings WHERE request_id = {_q(request_id)}").result_rows[0][0]
    return {"campaign_id": cid, "compound_id": compound, "status": st[0][0] if st else "REQUESTED",
            "has_result": bool(got)}


def explain(client: Client, request_id: str) -> dict[str, Any]:
    """Why a compound was requested: the request (or proposal), its model and policy, what the model
    had learned from, what happened to it, and people's decisions on it (approval-gated campaigns)."""
    res = client.query(f"SELECT * FROM requests WHERE request_id = {_q(request_id)} LIMIT 1")
    if not res.result_rows:  # proposed and not approved (yet)
        res = client.query(f"SELECT * FROM proposals WHERE request_id = {_q(request_id)} LIMIT 1")
    if not res.result_rows:
        raise NotFound(f"no request {request_id!r}")
    req = dict(zip(res.column_names, res.result_rows[0], strict=True))
    cid = req["campaign_id"]
    camp = client.query(f"SELECT objective_assay_id, direction, unit, policy, learner, schedule FROM campaigns "
                        f"WHERE campaign_id = {_q(cid)} ORDER BY event_time DESC LIMIT 1")
    campaign = dict(zip(camp.column_names, camp.result_rows[0], strict=True)) if camp.result_rows else {}
    mu = client.query(f"SELECT learner, device, n_train, n_readings, best_value, train_s FROM model_updates "
                      f"WHERE campaign_id = {_q(cid)} AND model_version = {int(req['model_version'])} "
                      f"ORDER BY done LIMIT 1")
    model = dict(zip(mu.column_names, mu.result_rows[0], strict=True)) if mu.result_rows else {}
    marks = req["trained_on"] or {}
    where = " OR ".join(f"(_topic = {_q(k.rsplit(':', 1)[0])} AND _partition = {int(k.rsplit(':', 1)[1])} "
                        f"AND _offset < {int(v)})" for k, v in marks.items()) or "0"
    # Readings the worker rejected sit in the readings table too (raw readings are append-only):
    # the dead letters of those messages name them.
    # A plate's dead letter names its first 20 rejected wells ("reading ID: why; ...").
    rejected = {rid for (msg,) in client.query(
        "SELECT error_message FROM dead_letters WHERE (" + where.replace("_topic", "source_topic")
        .replace("_partition", "source_partition").replace("_offset", "source_offset") + ")").result_rows
        for rid in re.findall(r"reading (\S+?):", msg)}
    if rejected:
        where = f"({where}) AND reading_id NOT IN ({', '.join(_q(r) for r in sorted(rejected))})"
    order = "ASC" if campaign.get("direction", "MAXIMIZE") == "MINIMIZE" else "DESC"
    assay = _q(campaign.get("objective_assay_id", req["assay_id"]))
    seen = client.query(f"SELECT count(), uniqExact(compound_id) FROM readings WHERE campaign_id = {_q(cid)} "
                        f"AND assay_id = {assay} AND ({where})").result_rows[0]
    best = client.query(f"SELECT compound_id, value, reading_id FROM readings WHERE campaign_id = {_q(cid)} "
                        f"AND assay_id = {assay} AND ({where}) ORDER BY value {order} LIMIT 5").result_rows
    outcome = client.query(f"SELECT status, event_time FROM request_status WHERE request_id = {_q(request_id)} "
                           f"ORDER BY event_time").result_rows
    result = client.query(f"SELECT value, unit, reading_id FROM readings WHERE request_id = {_q(request_id)}").result_rows
    return {"request": req, "campaign": campaign, "model": model,
            "training_readings": {"readings": seen[0], "compounds": seen[1], "watermarks": marks, "best": best},
            "outcome": {"statuses": outcome, "readings": result}, "decisions": decisions_of(client, request_id)}

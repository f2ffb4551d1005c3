"""A small client library for automation robots: take requests, report, publish results.

A robot consumes ``ExperimentRequest`` events, acts once per ``request_id``
(re-deliveries after a rebalance are skipped), reports ``RequestStatus`` and
publishes what its instrument measured as ``AssayReading`` or ``PlateReadout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import KafkaException

from labloop.consumers.kafka import KAFKA_LOG, make_consumer, make_producer
from labloop.schemas import TOPICS, Codec, DecodeError
from labloop.schemas.types import Record

__all__ = ["Measurement", "RobotClient"]

log = logging.getLogger("labloop.robot")


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Measurement:
    """One instrument result for one request: ``value`` of ``assay_id`` (None: the request's
    ``assay_id``) in that assay's unit."""

    request: Record
    value: float
    qualifier: str = "EQ"
    assay_id: str | None = None

    @property
    def assay(self) -> str:
        return self.assay_id or str(self.request["assay_id"])

    def reading_id(self, robot_id: str) -> str:
        """Stable per request, assay and robot: a result sent again is the same reading."""
        r = self.request
        return f"{r['request_id']}:{robot_id}" if self.assay == r["assay_id"] else f"{r['request_id']}:{self.assay}:{robot_id}"


class RobotClient:
    """Requests in, statuses and readings out.

    Args:
        kafka_config: confluent-kafka settings (bootstrap, security).
        codec: the event codec.
        robot_id: reported on every status.
        group_id: robots of one fleet share a group and split the requests.
        journal: this robot's write-ahead journal (JSON lines, fsynced): each request it takes on,
            before it acts; each result, before it is sent; and each batch settled, once the broker
            acknowledged its results and statuses. A restarted robot never takes a request twice,
            sends again the results the broker had not acknowledged, and hands back the requests it
            took but never finished (:meth:`unfinished`). None = remember only for this client's
            lifetime.
        campaigns, assays: the campaigns and assays it serves (None: all). Robots of one group
            split the requests, so robots that serve different ones need groups of their own.

    A request past its ``expires_at`` is never taken: the campaign has given up on it.
    """

    def __init__(self, kafka_config: dict[str, str], codec: Codec, robot_id: str = "robot-1",
                 group_id: str = "labloop-robots", session_timeout_s: float = 6.0,
                 journal: Path | None = None, campaigns: set[str] | None = None,
                 assays: set[str] | None = None) -> None:
        self.codec = codec
        self.robot_id = robot_id
        self.campaigns, self.assays = campaigns, assays
        self.skipped = {"expired": 0, "not_served": 0}
        self.seen: set[str] = set()
        self._journal: TextIO | None = None
        self._open: dict[str, Record] = {}  # taken, not settled: request id -> request
        self._resend: list[dict[str, Any]] = []  # "out" journal entries never acknowledged (requests: the open ones)
        self._unsettled: set[str] = set()  # request ids with statuses or results since the last flush
        self._buffer: list[dict[str, Any]] = []  # journal entries not written yet (statuses)
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if journal.exists():
                self._replay(journal)
                self._compact(journal)
            self._journal = open(journal, "a")  # noqa: SIM115 - closed in close()
        self.consumer = make_consumer(kafka_config, group_id, session_timeout_s, logger=KAFKA_LOG)
        # No delivery timeout: while the broker is away the producer keeps its results and retries;
        # the journal covers this process dying meanwhile.
        self.producer = make_producer(kafka_config, **{"message.timeout.ms": 0, "logger": KAFKA_LOG})
        self.executions = 0
        self.readings_published = 0
        self.consumer.subscribe([TOPICS["requests"].name])
        if self._resend:
            for e in self._resend:
                self._produce(e["topic"], e["record"]["campaign_id"], self.codec.encode(e["schema"], e["record"]))
            log.warning("%s: sending again %d message(s) the broker had not acknowledged before a restart",
                        robot_id, len(self._resend))
            self._resend = []

    def _replay(self, journal: Path) -> None:
        """Rebuild what the journal says: requests taken, messages unacknowledged, batches settled.
        A line cut short by a crash is ignored; lines of the older format (one request id each)
        count as taken and settled."""
        out: list[dict[str, Any]] = []
        settled: set[str] = set()
        for line in journal.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line.startswith("{"):
                if line:
                    self.seen.add(line)
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("t") == "taken":
                req = entry["request"]
                self.seen.add(req["request_id"])
                self._open[req["request_id"]] = req
            elif entry.get("t") == "out":
                out.append(entry)
            elif entry.get("t") == "settled":
                settled.update(entry["requests"])
        for rid in settled:
            self._open.pop(rid, None)
        for entry in out:
            ids = [rid for rid in entry["requests"] if rid not in settled]
            if not ids:
                continue
            self._resend.append({**entry, "requests": ids})
            self._unsettled.update(ids)
            if entry["schema"] != "RequestStatus":  # its result goes out again: nothing left to run
                for rid in ids:
                    self._open.pop(rid, None)

    def _compact(self, journal: Path) -> None:
        """Rewrite the journal as what it now means (a robot runs for months): the ids done, one
        per line, then the requests still open and the messages to send again."""
        open_ids = set(self._open)
        lines = sorted(self.seen - open_ids)  # an id here with messages below is still re-sent by them
        lines += [json.dumps({"t": "taken", "request": r}, separators=(",", ":")) for r in self._open.values()]
        lines += [json.dumps(e, separators=(",", ":")) for e in self._resend]
        tmp = journal.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal)

    def _write(self, *entries: dict[str, Any]) -> None:
        """Append ``entries`` after the buffered ones, in one fsynced write."""
        self._buffer.extend(entries)
        if self._journal is None or not self._buffer:
            self._buffer.clear()
            return
        self._journal.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in self._buffer))
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._buffer.clear()

    def _produce(self, topic: str, campaign_id: str, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, key=campaign_id.encode(), value=value)
                return
            except BufferError:  # the local queue is full while the broker is away: wait for room
                self.producer.poll(0.5)

    def _send(self, topic: str, schema: str, rec: Record, request_ids: list[str], durable: bool) -> None:
        """Journal, then produce. Results (``durable``) reach the disk before they leave; statuses
        wait in the buffer for the next write, which saves an fsync per status."""
        value = self.codec.encode(schema, rec)  # a record that cannot be encoded fails here, before the journal
        entry = {"t": "out", "topic": topic, "schema": schema, "record": rec, "requests": request_ids}
        if durable:
            self._write(entry)
        elif self._journal is not None:
            self._buffer.append(entry)
        self._unsettled.update(request_ids)
        self._produce(topic, rec["campaign_id"], value)

    def unfinished(self) -> list[Record]:
        """Requests taken before a restart whose results never went out: run them (or fail them)."""
        out = list(self._open.values())
        self._open.clear()
        return out

    def poll(self, timeout_s: float = 0.5, max_n: int = 1000) -> list[Record]:
        """New live requests it serves (each ``request_id`` once, ever, per client); offsets are committed."""
        out = []
        msgs = self.consumer.consume(max_n, timeout_s)
        for m in msgs:
            if m.error():
                continue
            try:
                r = self.codec.decode(m.value() or b"", expect=("ExperimentRequest",)).record
            except DecodeError:
                continue  # the sink and analysts see it; a robot cannot act on it
            if r["request_id"] in self.seen:
                continue
            if (self.campaigns is not None and r["campaign_id"] not in self.campaigns) or \
                    (self.assays is not None and not set(r.get("assays") or [r["assay_id"]]) <= self.assays):
                self.skipped["not_served"] += 1
                continue
            if r["expires_at"] <= _now_ms():
                self.skipped["expired"] += 1
                continue
            self.seen.add(r["request_id"])
            out.append(r)
        self._write(*({"t": "taken", "request": r} for r in out))
        if msgs:
            # Asynchronously: a synchronous commit blocked the batch for tens of seconds when the
            # broker went away just after the requests arrived, and the journal already skips
            # whatever a lost commit delivers again.
            try:
                self.consumer.commit(asynchronous=True)
            except KafkaException as exc:  # the broker is away: the journal skips what comes again
                log.warning("%s: cannot commit request offsets (%s); the journal skips re-deliveries",
                            self.robot_id, exc.args[0] if exc.args else exc)
        return out

    def requests(self, timeout_s: float = 0.5) -> Iterator[Record]:
        while True:
            yield from self.poll(timeout_s)

    def report(self, request: Record, status: str, reason: str | None = None) -> None:
        """Publish ``ACCEPTED``, ``STARTED``, ``COMPLETED`` or ``FAILED`` for a request."""
        if status in ("COMPLETED", "FAILED"):
            self.executions += 1
        rec = {"request_id": request["request_id"], "campaign_id": request["campaign_id"],
               "compound_id": request["compound_id"], "status": status, "robot_id": self.robot_id,
               "reason": reason, "event_time": _now_ms()}
        self._send(TOPICS["status"].name, "RequestStatus", rec, [request["request_id"]], durable=False)

    def publish_plate(self, results: Sequence[Measurement], unit: str, instrument_id: str,
                      plate_id: str | None = None) -> str:
        """Publish results of one campaign and assay as one ``PlateReadout``; returns the plate id."""
        if not results:
            raise ValueError("a plate needs at least one result")
        first = results[0].request
        plate_id = plate_id or f"plate-{uuid.uuid4().hex[:12]}"
        wells = []
        for i, m in enumerate(results):
            r = m.request
            if r["campaign_id"] != first["campaign_id"] or m.assay != results[0].assay:
                raise ValueError("a plate holds one campaign and one assay")
            wells.append({"reading_id": m.reading_id(self.robot_id), "compound_id": r["compound_id"],
                          "well": f"{'ABCDEFGHIJKLMNOP'[(i // 24) % 16]}{i % 24 + 1:02d}", "value": float(m.value),
                          "qualifier": m.qualifier, "request_id": r["request_id"]})
        t = _now_ms()
        rec = {"plate_id": plate_id, "campaign_id": first["campaign_id"], "assay_id": results[0].assay, "unit": unit,
               "instrument_id": instrument_id, "event_time": t, "ingest_time": t, "wells": wells}
        self._send(TOPICS["plates"].name, "PlateReadout", rec, [w["request_id"] for w in wells], durable=True)
        self.readings_published += len(wells)
        return plate_id

    def publish_reading(self, m: Measurement, unit: str, instrument_id: str) -> None:
        """Publish one result as an ``AssayReading``."""
        r, t = m.request, _now_ms()
        rec = {"reading_id": m.reading_id(self.robot_id), "campaign_id": r["campaign_id"],
               "compound_id": r["compound_id"], "assay_id": m.assay, "value": float(m.value), "unit": unit,
               "qualifier": m.qualifier, "request_id": r["request_id"], "instrument_id": instrument_id,
               "event_time": t, "ingest_time": t}
        self._send(TOPICS["readings"].name, "AssayReading", rec, [r["request_id"]], durable=True)
        self.readings_published += 1

    def flush(self, timeout_s: float | None = None, log_every_s: float = 30.0) -> None:
        """Wait until the broker acknowledged everything sent, then journal those requests settled.

        While the broker is away it keeps waiting (``timeout_s`` None), with one log line every
        ``log_every_s``; the results stay in the producer's queue and in the journal.

        Raises:
            TimeoutError: ``timeout_s`` passed with messages still unacknowledged.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited_since = time.monotonic()
        while True:
            step = log_every_s if deadline is None else max(0.0, min(log_every_s, deadline - time.monotonic()))
            self._write()  # the statuses' entries reach the disk before the wait
            left = self.producer.flush(step)
            if not left:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{left} messages not acknowledged by the broker within {timeout_s}s")
            log.warning("%s: the broker has not acknowledged %d message(s) for %.0f s; they are journaled and "
                        "will go when it is back", self.robot_id, left, time.monotonic() - waited_since)
        if self._unsettled:
            self._write({"t": "settled", "requests": sorted(self._unsettled)})
            self._unsettled.clear()
        else:
            self._write()  # buffered statuses

    def close(self, timeout_s: float = 10) -> None:
        """Flush (for at most ``timeout_s``: what is left stays journaled), leave the group and
        release both clients."""
        with contextlib.suppress(TimeoutError):
            self.flush(timeout_s)
        self.consumer.close()
        self.producer.close()
        if self._journal is not None:
            self._journal.close()

"""A small client library for automation robots: take requests, report, publish results.

A robot consumes ``ExperimentRequest`` events, acts once per ``request_id``
(re-deliveries after a rebalance are skipped), reports ``RequestStatus`` and
publishes what its instrument measured as ``AssayReading`` or ``PlateReadout``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from labloop.consumers.kafka import make_consumer, make_producer
from labloop.schemas import TOPICS, Codec, DecodeError
from labloop.schemas.types import Record

__all__ = ["Measurement", "RobotClient"]


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Measurement:
    """One instrument result for one request: ``value`` in the request assay's unit."""

    request: Record
    value: float
    qualifier: str = "EQ"


class RobotClient:
    """Requests in, statuses and readings out.

    Args:
        kafka_config: confluent-kafka settings (bootstrap, security).
        codec: the event codec.
        robot_id: reported on every status.
        group_id: robots of one fleet share a group and split the requests.
        journal: a file of the request ids this robot took on, one per line, appended before it
            acts and read back when it starts, so that a restarted robot never acts twice on a
            request delivered again (None = remember only for this client's lifetime).
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
        if journal is not None:
            journal.parent.mkdir(parents=True, exist_ok=True)
            if journal.exists():
                self.seen.update(line.strip() for line in journal.read_text().splitlines() if line.strip())
            self._journal = open(journal, "a")  # noqa: SIM115 - closed in close()
        self.consumer = make_consumer(kafka_config, group_id, session_timeout_s)
        self.producer = make_producer(kafka_config)
        self.executions = 0
        self.readings_published = 0
        self.consumer.subscribe([TOPICS["requests"].name])

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
                    (self.assays is not None and r["assay_id"] not in self.assays):
                self.skipped["not_served"] += 1
                continue
            if r["expires_at"] <= _now_ms():
                self.skipped["expired"] += 1
                continue
            self.seen.add(r["request_id"])
            out.append(r)
        if out and self._journal is not None:
            self._journal.write("".join(f"{r['request_id']}\n" for r in out))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        if msgs:
            self.consumer.commit(asynchronous=False)
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
        self.producer.produce(TOPICS["status"].name, key=request["campaign_id"].encode(),
                              value=self.codec.encode("RequestStatus", rec))

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
            if r["campaign_id"] != first["campaign_id"] or r["assay_id"] != first["assay_id"]:
                raise ValueError("a plate holds one campaign and one assay")
            wells.append({"reading_id": f"{r['request_id']}:{self.robot_id}", "compound_id": r["compound_id"],
                          "well": f"{'ABCDEFGHIJKLMNOP'[(i // 24) % 16]}{i % 24 + 1:02d}", "value": float(m.value),
                          "qualifier": m.qualifier, "request_id": r["request_id"]})
        t = _now_ms()
        rec = {"plate_id": plate_id, "campaign_id": first["campaign_id"], "assay_id": first["assay_id"], "unit": unit,
               "instrument_id": instrument_id, "event_time": t, "ingest_time": t, "wells": wells}
        self.producer.produce(TOPICS["plates"].name, key=first["campaign_id"].encode(),
                              value=self.codec.encode("PlateReadout", rec))
        self.readings_published += len(wells)
        return plate_id

    def publish_reading(self, m: Measurement, unit: str, instrument_id: str) -> None:
        """Publish one result as an ``AssayReading``."""
        r, t = m.request, _now_ms()
        rec = {"reading_id": f"{r['request_id']}:{self.robot_id}", "campaign_id": r["campaign_id"],
               "compound_id": r["compound_id"], "assay_id": r["assay_id"], "value": float(m.value), "unit": unit,
               "qualifier": m.qualifier, "request_id": r["request_id"], "instrument_id": instrument_id,
               "event_time": t, "ingest_time": t}
        self.producer.produce(TOPICS["readings"].name, key=r["campaign_id"].encode(),
                              value=self.codec.encode("AssayReading", rec))
        self.readings_published += 1

    def flush(self, timeout_s: float = 10) -> None:
        left = self.producer.flush(timeout_s)
        if left:
            raise TimeoutError(f"{left} messages not acknowledged by the broker within {timeout_s}s")

    def close(self) -> None:
        """Flush, leave the group and release both clients (before the broker goes away)."""
        self.flush()
        self.consumer.close()
        self.producer.close()
        if self._journal is not None:
            self._journal.close()

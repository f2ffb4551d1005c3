"""Schemas are versioned in schemas/avro/history; every newer version reads every older one."""

from __future__ import annotations

import io
import json
import re
import struct
import time
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from fastavro.utils import generate_many

from labloop.consumers.kafka import make_producer
from labloop.schemas import SCHEMA_DIR, TOPICS, Codec
from labloop.schemas.codec import crc64_avro
from labloop.streams.runtime import Stack

HISTORY = SCHEMA_DIR / "history"


def _versions() -> dict[str, list[tuple[int, Path]]]:
    out: dict[str, list[tuple[int, Path]]] = {}
    for p in HISTORY.glob("*.avsc"):
        m = re.fullmatch(r"(\w+)\.v(\d+)\.avsc", p.name)
        assert m, f"history file {p.name} is not Name.vN.avsc"
        out.setdefault(m.group(1), []).append((int(m.group(2)), p))
    return {k: sorted(v) for k, v in out.items()}


def test_every_schema_has_a_history_ending_in_the_current_version() -> None:
    versions = _versions()
    assert set(versions) == {p.stem for p in SCHEMA_DIR.glob("*.avsc")}
    for name, vs in versions.items():
        assert [v for v, _ in vs] == list(range(1, len(vs) + 1)), f"{name}: versions must be 1..N"
        latest = json.loads(vs[-1][1].read_text())
        current = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        assert to_parsing_canonical_form(latest) == to_parsing_canonical_form(current), \
            f"{name}.avsc changed: add it to history/ as v{len(vs) + 1}"


@pytest.mark.parametrize("name", sorted(_versions()))
def test_backward_transitive(name: str) -> None:
    """Data written with any version is readable by every later version (defaults fill the gaps)."""
    vs = [fastavro.parse_schema(json.loads(p.read_text())) for _, p in _versions()[name]]
    for i, writer in enumerate(vs):
        for record in generate_many(writer, 5):
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, writer, record)
            for reader in vs[i + 1 :]:
                buf.seek(0)
                fastavro.schemaless_reader(buf, writer, reader)


def _v1_request(codec: Codec, record: dict[str, Any]) -> bytes:
    v1 = json.loads((HISTORY / "ExperimentRequest.v1.avsc").read_text())
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v1), record)
    return b"\xc3\x01" + struct.pack("<Q", crc64_avro(to_parsing_canonical_form(v1).encode())) + buf.getvalue()


REQ = {"request_id": "evo-1", "campaign_id": "evolution", "compound_id": "X", "smiles": "CCO", "assay_id": "a",
       "priority": 0, "sequence": 0, "batch": 0, "policy": "random", "acquisition_score": None, "predicted_mean": None,
       "predicted_std": None, "model_version": 0, "event_time": 1, "expires_at": 2}


def test_codec_reads_v1_and_v2_side_by_side(codec: Codec) -> None:
    old = codec.decode(_v1_request(codec, REQ))
    new = codec.decode(codec.encode("ExperimentRequest", {**REQ, "request_id": "evo-2", "trained_on": {"t:0": 3}}))
    assert old.record["trained_on"] == {} and new.record["trained_on"] == {"t:0": 3}
    assert old.name == new.name == "ExperimentRequest"


def test_v1_and_v2_events_land_together(stack: Stack, codec: Codec, ch: Any) -> None:
    p = make_producer(stack.kafka_config)
    p.produce(TOPICS["requests"].name, key=b"evolution", value=_v1_request(codec, REQ))
    p.produce(TOPICS["requests"].name, key=b"evolution",
              value=codec.encode("ExperimentRequest", {**REQ, "request_id": "evo-2", "trained_on": {"t:0": 3}}))
    p.flush(10)
    p.close()
    deadline, rows = time.monotonic() + 30, []
    while time.monotonic() < deadline and len(rows) < 2:
        rows = ch.query("SELECT request_id, trained_on FROM requests WHERE campaign_id = 'evolution' "
                        "ORDER BY request_id").result_rows
        time.sleep(0.3)
    assert rows == [("evo-1", {}), ("evo-2", {"t:0": 3})]

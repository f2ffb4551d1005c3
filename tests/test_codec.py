"""Codec round trips for every schema, both framings, and every decode failure class."""

from __future__ import annotations

import json
import shutil
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from labloop.schemas import SCHEMA_DIR, Codec, SchemaError
from labloop.schemas.codec import crc64_avro
from labloop.schemas.errors import TruncatedPayload, UnknownFraming, UnknownSchema, WrongSchema

W = {"reading_id": "r", "compound_id": "c", "well": "A01", "value": -7.5, "qualifier": "LT", "request_id": None}
EXAMPLES = {
    "Campaign": {"campaign_id": "c1", "objective_assay_id": "a", "direction": "MINIMIZE", "unit": "nM", "batch_size": 8,
                 "init_size": 8, "budget": 64, "min_pool_size": 0, "policy": "ucb", "learner": "gp",
                 "schedule": "ROUNDS", "request_ttl_s": 60.0, "seed": 1,
                 "ranges": [{"assay_id": "a", "low": 0.0, "high": 1e4}],
                 "objectives": [{"assay_id": "sol", "unit": "ug/mL", "goal": "MAXIMIZE", "bound": None, "weight": 2.0},
                                {"assay_id": "tox", "unit": "uM", "goal": "AT_LEAST", "bound": 10.0, "weight": 1.0}],
                 "approval": True, "event_time": 1_700_000_000_000},
    "CompoundRegistered": {"campaign_id": "c1", "compound_id": "X1", "smiles": "CCO", "source": "lims",
                           "event_time": 1, "ingest_time": 2},
    "AssayReading": {"reading_id": "r1", "campaign_id": "c1", "compound_id": "X1", "assay_id": "a", "value": 1.25,
                     "unit": "nM", "qualifier": "GT", "request_id": "q1", "instrument_id": "i", "event_time": 3,
                     "ingest_time": 4},
    "PlateReadout": {"plate_id": "p", "campaign_id": "c1", "assay_id": "a", "unit": "nM", "instrument_id": "i",
                     "event_time": 5, "ingest_time": 6, "wells": [W, {**W, "reading_id": "r2", "request_id": "q"}]},
    "Prediction": {"campaign_id": "c1", "model_version": 3, "assay_id": "a", "event_time": 7,
                   "items": [{"compound_id": "X1", "mean": 1.0, "std": 0.5}]},
    "ExperimentRequest": {"request_id": "q1", "campaign_id": "c1", "compound_id": "X1", "smiles": "CCO", "assay_id": "a",
                          "assays": ["a", "sol"],
                          "priority": 0, "sequence": 0, "batch": 0, "policy": "ucb", "acquisition_score": None,
                          "predicted_mean": 2.0, "predicted_std": None, "model_version": 0,
                          "trained_on": {"labloop.plates:0": 12}, "event_time": 8,
                          "expires_at": 9},
    "RequestStatus": {"request_id": "q1", "campaign_id": "c1", "compound_id": "X1", "status": "FAILED",
                      "robot_id": "bot", "reason": "dropped", "event_time": 10},
    "ModelUpdate": {"campaign_id": "c1", "model_version": 1, "learner": "gp", "device": "cpu", "n_train": 8, "n_new": 8,
                    "n_measured": 8, "n_failed": 0, "n_pending": 8, "n_requested": 16, "pool_size": 100,
                    "best_value": None, "train_s": 0.1, "done": False, "n_readings": 8, "trained_on": {},
                    "live_n": 8, "live_rmse": 0.5, "live_nll": 1.25, "live_coverage90": 0.875, "live_spearman": None,
                    "event_time": 11},
    "Decision": {"decision_id": "d1", "campaign_id": "c1", "request_id": "q1", "action": "REJECT", "priority": 3,
                 "reason": "reactive", "decided_by": "alice", "event_time": 13},
    "DeadLetter": {"source_topic": "t", "source_partition": 0, "source_offset": 5, "source_key": b"k", "stage": "decode",
                   "service": "w", "error_class": "E", "error_message": "m", "raw": b"\x00\x01",
                   "rejected_ids": ["r1", "r2"], "event_time": 12},
}


def test_every_schema_has_an_example(codec: Codec) -> None:
    assert sorted(EXAMPLES) == codec.names


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_single_object_round_trip(codec: Codec, name: str) -> None:
    raw = codec.encode(name, EXAMPLES[name])
    assert raw[:2] == b"\xc3\x01"
    assert raw[2:10] == codec.fingerprint(name)
    got = codec.decode(raw, expect=(name,))
    assert (got.name, got.record, got.framing) == (name, EXAMPLES[name], "single-object")


def test_schemas_are_parsed_once(codec: Codec) -> None:
    """fastavro's reader and writer re-parse a schema on every call unless it carries the marker
    ``parse_schema`` leaves on it; without the marker one AssayReading decode took 11 us, 5 with it."""
    schemas = list(codec.current.values()) + list(codec._by_fp.values())
    assert len(schemas) > len(codec.current)  # history included
    for s in schemas:
        assert s.parsed.get("__fastavro_parsed") is True, s.name


def test_fingerprint_is_crc64_avro_of_canonical_form(codec: Codec) -> None:
    for name in codec.names:
        canonical = to_parsing_canonical_form(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()))
        assert codec.fingerprint(name) == bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    # The Avro specification's value for the empty input is the seed itself.
    assert crc64_avro(b"") == 0xC15D213AA4D7A795


class _Registry(BaseHTTPRequestHandler):
    """A minimal Confluent Schema Registry (subjects/versions, schemas/ids) over real HTTP."""

    schemas: list[str] = []

    def log_message(self, *a: object) -> None:
        pass

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["schema"] not in self.schemas:
            self.schemas.append(body["schema"])
        self._json(200, {"id": self.schemas.index(body["schema"]) + 1})

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["schemas", "ids"] and 0 < int(parts[2]) <= len(self.schemas):
            return self._json(200, {"schema": self.schemas[int(parts[2]) - 1]})
        self._json(404, {"error_code": 40403, "message": "Schema not found"})


@pytest.fixture(scope="module")
def registry_url():  # type: ignore[no-untyped-def]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_confluent_round_trip_and_cross_read(codec: Codec, registry_url: str, name: str) -> None:
    writer = Codec(registry_url=registry_url)
    raw = writer.encode(name, EXAMPLES[name])
    assert raw[0] == 0
    sid = struct.unpack(">I", raw[1:5])[0]
    assert sid >= 1
    # A fresh reader with the registry resolves the id; a reader without one refuses clearly.
    assert Codec(registry_url=registry_url).decode(raw).record == EXAMPLES[name]
    with pytest.raises(UnknownSchema, match="no schema registry"):
        codec.decode(raw)
    # The registry-configured codec still reads single-object events.
    assert writer.decode(codec.encode(name, EXAMPLES[name])).framing == "single-object"


def test_decode_failures_are_named(codec: Codec) -> None:
    raw = codec.encode("AssayReading", EXAMPLES["AssayReading"])
    with pytest.raises(UnknownFraming):
        codec.decode(b'{"json": true}')
    with pytest.raises(UnknownFraming):
        codec.decode(b"")
    with pytest.raises(UnknownSchema):
        codec.decode(b"\xc3\x01" + b"\xff" * 8 + raw[10:])
    with pytest.raises(TruncatedPayload):
        codec.decode(raw[:-4])
    with pytest.raises(TruncatedPayload):
        codec.decode(raw[:6])
    with pytest.raises(TruncatedPayload):
        codec.decode(raw + b"\x00")
    with pytest.raises(WrongSchema, match="got AssayReading"):
        codec.decode(raw, expect=("PlateReadout",))


def test_encode_rejects_records_that_do_not_fit(codec: Codec) -> None:
    with pytest.raises(SchemaError):
        codec.encode("AssayReading", {**EXAMPLES["AssayReading"], "value": "high"})
    with pytest.raises(SchemaError, match="no schema named"):
        codec.encode("Nope", {})


def test_older_writer_in_history_is_read_as_current(tmp_path: Path, codec: Codec) -> None:
    """A v1 writer (no optional field) decodes with the current reader filling the default."""
    folder = tmp_path / "avro"
    shutil.copytree(SCHEMA_DIR, folder)
    (folder / "history").mkdir(exist_ok=True)
    v1 = json.loads((SCHEMA_DIR / "AssayReading.avsc").read_text())
    v1["fields"] = [f for f in v1["fields"] if f["name"] != "request_id"]
    (folder / "history" / "AssayReading.v0.avsc").write_text(json.dumps(v1))
    import io

    import fastavro

    buf = io.BytesIO()
    parsed = fastavro.parse_schema(v1)
    rec = {k: v for k, v in EXAMPLES["AssayReading"].items() if k != "request_id"}
    fastavro.schemaless_writer(buf, parsed, rec)
    fp = struct.pack("<Q", crc64_avro(to_parsing_canonical_form(v1).encode()))
    got = Codec(schema_dir=folder).decode(b"\xc3\x01" + fp + buf.getvalue())
    assert got.record == {**rec, "request_id": None}
    with pytest.raises(UnknownSchema):
        codec.decode(b"\xc3\x01" + fp + buf.getvalue())


def _items(codec: Codec, msgs: list[bytes]) -> dict[str, tuple[float, float]]:
    out = {}
    for raw in msgs:
        for it in codec.decode(raw).record["items"]:
            out[it["compound_id"]] = (it["mean"], it["std"])
    return out


def test_the_numpy_prediction_writer_reads_like_the_codec(codec: Codec) -> None:
    """The fast path for pool rescoring writes the same bytes as fastavro, chunked, ids of any length."""
    import numpy as np

    from labloop.streams.campaign import PREDICTION_CHUNK, PredictionWriter

    rng = np.random.default_rng(1)
    n = PREDICTION_CHUNK + 37
    ids = [f"c{i}" + "é" * int(rng.integers(0, 80)) for i in range(n)]
    mean, std = rng.normal(size=n), rng.random(n) + 0.1
    w = PredictionWriter(codec)
    for version in (1, 2):  # every row moved: the whole pool, in row order, twice
        msgs = w.encode("camp", "assay", version, ids, mean + version, std, 123, 0.05)
        assert len(msgs) == 2 and w.last_rows == n
        for k, raw in enumerate(msgs):
            s, e = k * PREDICTION_CHUNK, min((k + 1) * PREDICTION_CHUNK, n)
            rec = {"campaign_id": "camp", "model_version": version, "assay_id": "assay", "event_time": 123,
                   "items": [{"compound_id": ids[i], "mean": float(mean[i] + version), "std": float(std[i])}
                             for i in range(s, e)]}
            assert raw == codec.encode("Prediction", rec)


def test_the_prediction_writer_publishes_what_moved_past_the_tolerance(codec: Codec) -> None:
    """A version publishes the rows that moved by more than tolerance x sd since last published
    (and new rows); the newest published value of every row stays within that of the model's;
    ``complete`` fills in the rest of a final version."""
    import numpy as np

    from labloop.streams.campaign import PredictionWriter

    rng = np.random.default_rng(2)
    ids = [f"c{i}" for i in range(50)]
    mean, std = rng.normal(size=50), np.ones(50)
    w = PredictionWriter(codec)
    latest = _items(codec, w.encode("camp", "a", 1, ids, mean, std, 1, 0.05))
    assert len(latest) == 50
    drift = np.zeros(50)
    for version in range(2, 12):  # each row creeps by 0.02 sd per version on odd rows; two rows jump
        drift[1::2] += 0.02
        m = mean + drift
        m[version] += 1.0
        got = _items(codec, w.encode("camp", "a", version, ids, m, std, 1, 0.05))
        assert f"c{version}" in got and all(int(k[1:]) % 2 == 1 or int(k[1:]) == version or int(k[1:]) == version - 1
                                           for k in got)  # even rows move only by their jump (and back)
        latest.update(got)
        assert max(abs(latest[c][0] - m[i]) for i, c in enumerate(ids)) <= 0.05 + 1e-12
    assert 0 < w.last_rows < 50
    ids2 = [*ids, "new"]  # the pool grew: the new row is published with the next version
    m2, s2 = np.append(m, 0.0), np.append(std, 1.0)
    assert "new" in _items(codec, w.encode("camp", "a", 12, ids2, m2, s2, 1, 0.05))
    quiet = w.encode("camp", "a", 13, ids2, m2, s2, 1, 0.05)  # nothing moved: one message without items
    assert len(quiet) == 1 and codec.decode(quiet[0]).record["items"] == [] and w.last_rows == 0
    final = w.encode("camp", "a", 13, ids2, m2, s2, 1, 0.0, complete=True)
    assert len(_items(codec, final)) == 51  # every row now published at version 13, none twice
    assert w.encode("camp", "a", 13, ids2, m2, s2, 1, 0.0, complete=True) and w.last_rows == 0

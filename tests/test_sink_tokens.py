"""Deduplication tokens: the same messages give the same token; reused offsets do not."""

from __future__ import annotations

from labloop.consumers.columns import Batch as _Batch
from labloop.consumers.columns import Seen as _Seen
from labloop.consumers.tables import TABLES

REC = {"request_id": "r", "campaign_id": "c", "compound_id": "x", "status": "ACCEPTED", "robot_id": "b",
       "reason": None, "event_time": 0}


def _token(cluster: str, first_ts: int, offsets: range = range(5, 9)) -> str:
    b = _Batch(TABLES["request_status"], cluster)
    for o in reversed(offsets):  # arrival order does not matter
        b.add(REC, "labloop.request-status", 2, o, first_ts + o)
    return b.token()


def test_rereading_a_range_gives_the_same_token() -> None:
    assert _token("k1", 1000) == _token("k1", 1000)
    assert "labloop.request-status:2:5-8@1005" in _token("k1", 1000)


def test_a_new_broker_or_recreated_topic_gives_a_new_token() -> None:
    assert _token("k1", 1000) != _token("k2", 1000)  # another cluster, same offsets
    assert _token("k1", 1000) != _token("k1", 2000)  # same cluster, topic recreated: offsets reused


def test_rows_carry_their_provenance() -> None:
    b = _Batch(TABLES["request_status"], "k")
    b.add(REC, "labloop.request-status", 1, 42, 7)
    t = b.arrow()
    assert t.num_rows == 1
    assert t.column("_topic").to_pylist() == ["labloop.request-status"]
    assert t.column("_cluster").to_pylist() == ["k"]
    assert (t.column("_partition").to_pylist(), t.column("_offset").to_pylist()) == ([1], [42])


def test_plates_and_singles_mix_in_one_readings_batch() -> None:
    """Runs (a plate's campaign) and per-row lists (its wells) and single readings build the same columns."""
    b = _Batch(TABLES["readings"], "k")
    well = {"reading_id": "w", "compound_id": "x", "well": "A01", "value": 1.5, "qualifier": "LT", "request_id": None}
    plate = {"plate_id": "p1", "campaign_id": "c", "assay_id": "a", "unit": "u", "instrument_id": "i",
             "event_time": 1000, "ingest_time": 2000, "wells": [well, {**well, "reading_id": "w2", "value": 2.5}]}
    single = {"reading_id": "s", "campaign_id": "c", "compound_id": "y", "assay_id": "a", "value": 3.5, "unit": "u",
              "qualifier": "GT", "request_id": "q", "instrument_id": "i", "event_time": 3000, "ingest_time": 4000}
    b.add(plate, "labloop.plates", 0, 5)
    b.add(single, "labloop.readings", 0, 9)
    t = b.arrow().to_pydict()
    assert t["reading_id"] == ["w", "w2", "s"] and t["value"] == [1.5, 2.5, 3.5]
    assert t["qualifier"] == ["<", "<", ">"] and t["plate_id"] == ["p1", "p1", None]
    assert t["campaign_id"] == ["c"] * 3 and t["_offset"] == [5, 5, 9]
    assert [x.timestamp() for x in t["event_time"]] == [1.0, 1.0, 3.0]


def test_a_resent_event_is_stored_once_by_its_natural_key() -> None:
    """A reading re-sent (new offset, same reading_id) is dropped, alone or inside a plate, and
    forgetting past the window is by age; without a key memory (the control) both are kept."""
    seen = _Seen(cap=3)
    b = _Batch(TABLES["readings"], "k")
    well = {"reading_id": "w1", "compound_id": "x", "well": "A01", "value": 1.0, "qualifier": "EQ", "request_id": None}
    plate = {"plate_id": "p", "campaign_id": "c", "assay_id": "a", "unit": "u", "instrument_id": "i",
             "event_time": 0, "ingest_time": 0, "wells": [well, {**well, "reading_id": "w2"}, {**well, "reading_id": "w1"}]}
    single = {"reading_id": "w2", "campaign_id": "c", "compound_id": "x", "assay_id": "a", "value": 1.0, "unit": "u",
              "qualifier": "EQ", "request_id": None, "instrument_id": "i", "event_time": 0, "ingest_time": 0}
    assert b.add(plate, "labloop.plates", 0, 1, 0, seen) == 2  # w1 twice in one plate: once
    assert b.add(single, "labloop.readings", 0, 7, 0, seen) == 0  # w2 again, as a single reading
    assert b.arrow().column("reading_id").to_pylist() == ["w1", "w2"] and seen.dropped == 2
    seen.add("readings", ["a", "b"])  # over the cap of 3: the oldest key (w1) is forgotten
    assert b.add({**single, "reading_id": "w1"}, "labloop.readings", 0, 8, 0, seen) == 1
    control = _Batch(TABLES["readings"], "k")
    assert control.add(single, "labloop.readings", 0, 7) + control.add(single, "labloop.readings", 0, 9) == 2


def test_every_table_but_predictions_names_a_natural_key() -> None:
    cols = {name: {c for c, _ in t.columns} for name, t in TABLES.items()}
    assert all(set(t.key) <= cols[name] for name, t in TABLES.items())
    assert {name for name, t in TABLES.items() if not t.key} == {"predictions"}

"""Deduplication tokens: the same messages give the same token; reused offsets do not."""

from __future__ import annotations

from consumers.clickhouse import TABLES, _Batch

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
    assert b.add(REC, "labloop.request-status", 1, 42, 7) == 1
    assert b.columns[-3:] == [["labloop.request-status"], [1], [42]]

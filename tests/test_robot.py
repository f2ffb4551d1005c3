"""Robots act once per request_id, across their own restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from labloop.consumers import RobotClient
from labloop.consumers.kafka import make_producer
from labloop.schemas import TOPICS, Codec
from labloop.streams.runtime import EmbeddedBroker, ensure_topics

REQ = {"request_id": "jr-r0000001", "campaign_id": "journal", "compound_id": "c1", "smiles": "CCO", "assay_id": "a",
       "priority": 0, "sequence": 1, "batch": 0, "policy": "ucb", "acquisition_score": None, "predicted_mean": None,
       "predicted_std": None, "model_version": 0, "trained_on": {}, "event_time": 0, "expires_at": 2**53}


def _take(robot: RobotClient, want: int, grace_s: float = 1.0, timeout_s: float = 20) -> list[str]:
    """Requests the robot takes on: until ``want`` arrived, then ``grace_s`` more for any extra."""
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(got) < want:
        got += [r["request_id"] for r in robot.poll(0.3)]
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        got += [r["request_id"] for r in robot.poll(0.3)]
    return got


def test_a_restarted_robot_never_takes_a_request_twice(broker: EmbeddedBroker, codec: Codec, tmp_path: Path) -> None:
    conf = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(conf)
    p = make_producer(conf)
    for rid in ("jr-r0000001", "jr-r0000002"):
        p.produce(TOPICS["requests"].name, key=b"journal", value=codec.encode("ExperimentRequest", {**REQ, "request_id": rid}))
    p.flush(10)
    journal = tmp_path / "robot.journal"
    first = RobotClient(conf, codec, robot_id="j", group_id="journal-1", journal=journal)
    assert sorted(_take(first, 2)) == ["jr-r0000001", "jr-r0000002"]
    first.close()
    # Everything is delivered again (a new group reads from the start), as after a lost commit.
    p.produce(TOPICS["requests"].name, key=b"journal", value=codec.encode("ExperimentRequest", {**REQ, "request_id": "jr-r0000003"}))
    p.flush(10)
    second = RobotClient(conf, codec, robot_id="j", group_id="journal-2", journal=journal)
    # The first run took two and reported nothing for them: the second hands them back to be run.
    assert sorted(r["request_id"] for r in second.unfinished()) == ["jr-r0000001", "jr-r0000002"]
    assert _take(second, 1, grace_s=2.0) == ["jr-r0000003"]
    second.close()
    taken = [json.loads(line)["request"]["request_id"] if line.startswith("{") else line
             for line in journal.read_text().splitlines()]
    assert sorted(taken) == ["jr-r0000001", "jr-r0000002", "jr-r0000003"]  # each once, compacted at the restart
    control = RobotClient(conf, codec, robot_id="j", group_id="journal-3")  # no journal: takes them all again
    assert len(_take(control, 3)) == 3
    control.close()


def test_a_robot_takes_only_live_requests_of_what_it_serves(broker: EmbeddedBroker, codec: Codec) -> None:
    conf = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(conf)
    p = make_producer(conf)
    for rid, over in (("live-1", {}), ("expired-1", {"expires_at": 1}), ("other-campaign", {"campaign_id": "other"}),
                      ("other-assay", {"assay_id": "b"}), ("live-2", {})):
        rec = {**REQ, "campaign_id": "mine", "request_id": rid, **over}
        p.produce(TOPICS["requests"].name, key=rec["campaign_id"].encode(), value=codec.encode("ExperimentRequest", rec))
    p.flush(10)
    robot = RobotClient(conf, codec, robot_id="picky", group_id="picky", campaigns={"mine"}, assays={"a"})
    try:
        assert sorted(_take(robot, 2, grace_s=2.0)) == ["live-1", "live-2"]
        # Other tests' requests on this broker are not served either: at least the two here.
        assert robot.skipped["expired"] == 1 and robot.skipped["not_served"] >= 2
    finally:
        robot.close()


def test_a_robot_stopped_during_its_first_join_leaves_its_fleet_working(broker: EmbeddedBroker, codec: Codec) -> None:
    """On Tansu, a member that left while its group was forming stayed the group's leader, and no
    later robot of the fleet got a request (none of 5 in 120 s, measured): a robot's close waits
    for its join first."""
    conf = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(conf)
    p = make_producer(conf)
    ids = [f"join-r{i:07d}" for i in range(5)]
    for rid in ids:
        p.produce(TOPICS["requests"].name, key=rid.encode(), value=codec.encode("ExperimentRequest", {
            **REQ, "request_id": rid, "campaign_id": "join"}))
    p.flush(10)
    early = RobotClient(conf, codec, robot_id="early", group_id="join-fleet", campaigns={"join"})
    early.poll(0.2)  # its join has started; Tansu answers it seconds later
    assert not early.consumer.assignment()
    early.close()  # before it took anything
    later = RobotClient(conf, codec, robot_id="later", group_id="join-fleet", campaigns={"join"})
    try:
        assert sorted(_take(later, 5, grace_s=0.0, timeout_s=30)) == ids
    finally:
        later.close()

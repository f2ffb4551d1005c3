"""An approval-gated campaign through the real broker, worker, virtual lab and chDB sink.

Nothing reaches the robot before a person approves it, a rejected compound is never requested
or proposed again, and every decision is in Kafka and ClickHouse with who, when and why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.approval import decision_record, pending_proposals
from labloop.consumers.kafka import make_producer
from labloop.consumers.publisher import publish_records
from labloop.schemas import Codec
from labloop.streams.campaign import now_ms
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import Stack

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID = "gated-it"
BUDGET = 20


def _proposals(ch: Any, want: int, decided: set[str] = frozenset(), timeout_s: float = 90) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """``want`` proposals waiting, leaving out those decided (the sink may not have stored the decisions yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = [r for r in pending_proposals(ch, CID) if r["request_id"] not in decided]
        if len(rows) >= want:
            return rows
        time.sleep(0.3)
    raise AssertionError(f"{want} proposal(s) did not arrive: {pending_proposals(ch, CID)}")


def test_an_approval_gated_campaign_sends_only_approved_requests(stack: Stack, codec: Codec, ch: Any, cli: Any,
                                                                  define_campaign: Any, settle: Any) -> None:
    spec = CampaignSpec(CID, "tpsa", "A^2", batch_size=10, init_size=10, budget=BUDGET, min_pool_size=300, seed=5,
                        request_ttl_s=600.0, approval=True)
    robot = RobotClient(stack.kafka_config, codec, robot_id="gated-robot", group_id="gated-robots", campaigns={CID})
    lab = VirtualLab(robot, Oracle.from_csv(DATA, "smiles", "tpsa"), LabConfig(unit="A^2", plate_size=0)).start()
    try:
        define_campaign(stack.kafka_config, spec, DATA)
        first = _proposals(ch, 10)
        time.sleep(2.0)  # the robot polls all along: it has nothing to take
        assert robot.seen == set() and lab.readings_published == 0
        assert int(ch.query(f"SELECT count() FROM requests WHERE campaign_id = '{CID}'").result_rows[0][0]) == 0
        shown = cli("proposals", "--campaign", CID)
        assert shown.returncode == 0 and "10 proposal(s) waiting" in shown.stdout, shown.stdout + shown.stderr
        st = cli("status")
        row = next((ln.split("│") for ln in st.stdout.splitlines() if ln.startswith(f"│ {CID} ")), None)
        assert row is not None and row[2].strip() == "waiting for approval" and row[-2].strip() == "10", st.stdout + st.stderr

        ids = [r["request_id"] for r in first]
        rejected = {r["compound_id"] for r in first[:2]}
        out = cli("reject", *ids[:2], "--reason", "reactive Michael acceptor", "--by", "alice")
        assert out.returncode == 0, out.stderr
        out = cli("approve", *ids[2:5], "--priority", "1", "--by", "bob")
        assert out.returncode == 0, out.stderr
        again = cli("approve", ids[0], "--by", "bob")  # rejected already: refused, nothing sent
        assert again.returncode != 0 and "rejected already, by alice" in again.stderr, again.stderr
        producer = make_producer(stack.kafka_config)
        decided = set(ids[:5])

        def decide(rows: list[dict[str, Any]], n_reject: int) -> None:
            recs = [decision_record(ch, r["request_id"], "REJECT", "carol", now_ms(), "too close to the last hit")
                    for r in rows[:n_reject]]
            recs += [decision_record(ch, r["request_id"], "APPROVE", "carol", now_ms()) for r in rows[n_reject:]]
            rejected.update(r["compound_id"] for r in rows[:n_reject])
            decided.update(r["request_id"] for r in rows)
            publish_records(producer, codec, "decisions", "Decision", iter(recs))

        decide(first[5:], 0)
        # Later rounds: reject some of each until the budget is spent by approved requests alone.
        approved = 8
        while approved < BUDGET:
            rows = _proposals(ch, min(10, BUDGET - approved), decided)
            assert not rejected & {r["compound_id"] for r in rows}  # never proposed again
            n_reject = 1 if len(rows) == 10 else 0  # full rounds: 10 proposed, 9 approved (8 + 9 + 3 = 20)
            decide(rows, n_reject)
            approved += len(rows) - n_reject
        assert settle(f"SELECT count() FROM model_updates WHERE campaign_id = '{CID}' AND done", 1, 120) == 1
    finally:
        lab.stop()
    requests = ch.query(f"SELECT request_id, compound_id, priority FROM requests WHERE campaign_id = '{CID}'").result_rows
    assert len(requests) == BUDGET and len({c for _, c, _ in requests}) == BUDGET
    assert not rejected & {c for _, c, _ in requests} and robot.seen == {r for r, _, _ in requests}
    assert {p for r, _, p in requests if r in ids[2:5]} == {1}  # the priority bob set
    # Every request the robots could read came after its approval.
    late = ch.query(f"SELECT count() FROM requests AS q LEFT JOIN (SELECT request_id, min(event_time) AS t FROM decisions "
                    f"WHERE action = 'APPROVE' GROUP BY request_id) AS d ON q.request_id = d.request_id "
                    f"WHERE q.campaign_id = '{CID}' AND (d.t IS NULL OR d.t > q.event_time)").result_rows[0][0]
    assert late == 0
    assert settle(f"SELECT count() FROM readings WHERE campaign_id = '{CID}'", BUDGET) == BUDGET
    who = ch.query(f"SELECT decided_by, reason FROM decisions WHERE campaign_id = '{CID}' AND action = 'REJECT' "
                   f"ORDER BY event_time").result_rows
    assert who[:2] == [("alice", "reactive Michael acceptor")] * 2 and len(who) == len(rejected)
    shown = cli("explain", ids[0])
    assert shown.returncode == 0 and "reject by alice: reactive Michael acceptor" in shown.stdout, shown.stdout + shown.stderr

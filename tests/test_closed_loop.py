"""A small closed loop through the real broker, Faust worker, virtual lab and chDB sink.

300 NCI compounds, TPSA as the oracle (maximized), 5 rounds of 20 after a random
start of 20, 5% random instrument failures, plus poison events beside the good ones.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.kafka import make_consumer, make_producer
from labloop.consumers.publisher import compound_rows, publish_records
from labloop.schemas import TOPICS, Codec
from labloop.streams.runtime import Stack

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID = "tpsa-it"
GHOST = "ghost-it"  # a campaign id nobody defines
BUDGET, INIT, BATCH = 100, 20, 20


def _wait_done(stack: Stack, codec: Codec, timeout_s: float = 180) -> dict[str, Any]:
    mon = make_consumer(stack.kafka_config, "it-monitor")
    mon.subscribe([TOPICS["model_updates"].name])
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stack.check()
            for m in mon.consume(100, 0.5):
                if m.error():
                    continue
                r = codec.decode(m.value()).record
                if r["campaign_id"] == CID and r["done"]:
                    return r
    finally:
        mon.close()
    raise AssertionError("campaign did not finish")


def _settle(ch: Any, sql: str, want: int, timeout_s: float = 30) -> int:
    got = -1
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = int(ch.query(sql).result_rows[0][0])
        if got >= want:
            return got
        time.sleep(0.3)
    return got


@pytest.fixture(scope="module")
def loop(stack: Stack, codec: Codec, ch: Any) -> dict[str, Any]:
    producer = make_producer(stack.kafka_config)
    publish_records(producer, codec, "campaigns", "Campaign", iter([{
        "campaign_id": CID, "objective_assay_id": "tpsa", "direction": "MAXIMIZE", "unit": "A^2",
        "batch_size": BATCH, "init_size": INIT, "budget": BUDGET, "min_pool_size": 300, "policy": "ucb",
        "learner": "gp", "schedule": "ROUNDS", "request_ttl_s": 600.0, "seed": 3, "event_time": 0}]))
    pub = publish_records(producer, codec, "compounds", "CompoundRegistered", compound_rows(DATA, CID))
    assert pub.published == 302 and not pub.errors

    # Poison beside the good events: each must end on the dead-letter topic with its provenance.
    delivered: list[tuple[str, int, int]] = []

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None
        delivered.append((msg.topic(), msg.partition(), msg.offset()))

    good = {"reading_id": "", "campaign_id": CID, "compound_id": "", "assay_id": "tpsa", "value": 1.0, "unit": "A^2",
            "qualifier": "EQ", "request_id": None, "instrument_id": "poison", "event_time": 0, "ingest_time": 0}
    some_compound = next(r for r in compound_rows(DATA, CID) if not isinstance(r, Exception))["compound_id"]
    poison = [
        codec.encode("AssayReading", {**good, "reading_id": "p-nan", "compound_id": some_compound, "value": math.nan}),
        codec.encode("AssayReading", {**good, "reading_id": "p-unknown", "compound_id": "NO-SUCH-COMPOUND"}),
        codec.encode("AssayReading", {**good, "reading_id": "p-unit", "compound_id": some_compound, "unit": "nm^2"}),
        codec.encode("AssayReading", {**good, "reading_id": "p-request", "compound_id": some_compound,
                                      "request_id": "no-such-request"}),
        b"\x7bnot avro\x7d",
        codec.encode("CompoundRegistered", {"campaign_id": CID, "compound_id": "wrong-topic", "smiles": "C",
                                            "source": "x", "event_time": 0, "ingest_time": 0}),
    ]
    for raw in poison:
        producer.produce(TOPICS["readings"].name, key=CID.encode(), value=raw, on_delivery=on_delivery)
    producer.flush(10)
    # Readings of a campaign nobody defined, alone and as a plate: dead letters, and no state for the id.
    ghost: list[tuple[str, int, int]] = []
    producer.produce(TOPICS["readings"].name, key=GHOST.encode(), value=codec.encode("AssayReading", {
        **good, "reading_id": "g-1", "campaign_id": GHOST, "compound_id": some_compound}),
        on_delivery=lambda err, msg: ghost.append((msg.topic(), msg.partition(), msg.offset())))
    producer.produce(TOPICS["plates"].name, key=GHOST.encode(), value=codec.encode("PlateReadout", {
        "plate_id": "g-plate", "campaign_id": GHOST, "assay_id": "tpsa", "unit": "A^2", "instrument_id": "poison",
        "event_time": 0, "ingest_time": 0, "wells": [{"reading_id": "g-2", "compound_id": some_compound, "value": 1.0,
                                                       "qualifier": "EQ", "request_id": None, "well": "A1"}]}),
        on_delivery=lambda err, msg: ghost.append((msg.topic(), msg.partition(), msg.offset())))
    producer.flush(10)
    producer.close()

    oracle = Oracle.from_csv(DATA, "smiles", "tpsa")
    # Its own fleet, serving this campaign only: the requests topic also holds other tests' campaigns,
    # which another fleet (another consumer group) may have answered already.
    lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="it-robot", group_id="it-robots", campaigns={CID}), oracle,
                     LabConfig(failure_rate=0.05, unit="A^2", seed=1)).start()
    try:
        final = _wait_done(stack, codec)
    finally:
        lab.stop()
    assert not lab.errors
    return {"final": final, "lab": lab, "poison": delivered, "oracle": oracle, "ghost": ghost}


def test_budget_spent_once_per_compound(loop: dict[str, Any], ch: Any) -> None:
    assert _settle(ch, f"SELECT count() FROM requests WHERE campaign_id='{CID}'", BUDGET) == BUDGET
    n, ids, compounds = ch.query(f"SELECT count(), uniqExact(request_id), uniqExact(compound_id) FROM requests "
                                 f"WHERE campaign_id='{CID}'").result_rows[0]
    assert n == ids == compounds == BUDGET  # never re-requested a measured or pending compound
    batches = ch.query(f"SELECT batch, count() FROM requests WHERE campaign_id='{CID}' GROUP BY batch ORDER BY batch")
    assert [c for _, c in batches.result_rows] == [INIT] + [BATCH] * ((BUDGET - INIT) // BATCH)
    assert loop["final"]["n_pending"] == 0 and loop["final"]["n_requested"] == BUDGET


def test_every_request_answered_and_robot_acted_once(loop: dict[str, Any], ch: Any) -> None:
    lab = loop["lab"]
    assert lab.robot.executions == BUDGET
    answered = _settle(ch, f"SELECT uniqExact(request_id) FROM request_status WHERE campaign_id='{CID}' "
                           f"AND status IN ('COMPLETED','FAILED')", BUDGET)
    assert answered == BUDGET
    failed = ch.query(f"SELECT count() FROM request_status WHERE campaign_id='{CID}' AND status='FAILED'").result_rows[0][0]
    assert failed == lab.failed > 0
    assert loop["final"]["n_failed"] == lab.failed
    assert loop["final"]["n_measured"] == BUDGET - lab.failed


def test_every_event_in_clickhouse_exactly_once(loop: dict[str, Any], ch: Any) -> None:
    lab = loop["lab"]
    want = lab.readings_published
    got = _settle(ch, f"SELECT count() FROM readings WHERE campaign_id='{CID}' AND instrument_id != 'poison'", want)
    assert got == want
    n, distinct = ch.query(f"SELECT count(), uniqExact(reading_id) FROM readings WHERE campaign_id='{CID}'").result_rows[0]
    assert n == distinct == want + 4  # the four schema-valid poison readings are kept as raw records
    assert ch.query(f"SELECT count(), uniqExact(compound_id) FROM compounds WHERE campaign_id='{CID}'").result_rows[0] == (302, 302)
    assert ch.query(f"SELECT count() FROM readings WHERE campaign_id='{CID}' AND plate_id IS NULL "
                    f"AND instrument_id != 'poison'").result_rows[0][0] == 0  # the lab reports whole plates
    assert _settle(ch, f"SELECT count() FROM campaigns WHERE campaign_id='{CID}'", 1) == 1
    last = loop["final"]["model_version"]
    assert last >= 5  # at least one update per answered batch
    n_updates = _settle(ch, f"SELECT count() FROM model_updates WHERE campaign_id='{CID}'", last)
    assert n_updates in (last, last + 1)  # + the final done report when the last answers were failures
    assert ch.query(f"SELECT uniqExact(model_version, done), uniqExact(model_version), countIf(done) FROM model_updates "
                    f"WHERE campaign_id='{CID}'").result_rows[0] == (n_updates, last, 1)
    # Each version publishes the predictions that moved (the first version all 300), the final one
    # completes the pool: every compound's newest prediction is the final model's, none sent twice.
    _settle(ch, f"SELECT countIf(model_version = {last}) FROM predictions WHERE campaign_id='{CID}'", 300)
    preds = ch.query(f"SELECT count(), uniqExact(model_version, compound_id), countIf(model_version = 1), "
                     f"countIf(model_version = {last}) FROM predictions WHERE campaign_id='{CID}'").result_rows[0]
    assert preds[0] == preds[1] and preds[2] == 300 and preds[3] == 300, preds


def test_campaign_beats_random(loop: dict[str, Any], ch: Any) -> None:
    oracle: Oracle = loop["oracle"]
    values = np.array([v for v in oracle.values.values() if np.isfinite(v)])
    rows = ch.query(f"SELECT q.batch, c.smiles FROM requests q JOIN compounds c USING (campaign_id, compound_id) "
                    f"WHERE q.campaign_id='{CID}'").result_rows
    guided = np.array([oracle(s) for b, s in rows if b > 0])
    random_start = np.array([oracle(s) for b, s in rows if b == 0])
    # top-30 of the pool found: random sampling of 100/300 finds a third of them on average
    top30 = np.sort(values)[-30:].min()
    found = sum(oracle(s) >= top30 for _, s in rows)
    assert found >= 20, f"found {found} of the top 30"
    assert guided.mean() > max(values.mean() + 0.5 * values.std(), random_start.mean())


def test_poison_is_dead_lettered_with_provenance(loop: dict[str, Any], ch: Any) -> None:
    topic = TOPICS["readings"].name
    where = " OR ".join(f"(source_partition={p} AND source_offset={o})" for _, p, o in loop["poison"])
    _settle(ch, f"SELECT count() FROM dead_letters WHERE source_topic='{topic}' AND ({where})", len(loop["poison"]))
    rows = ch.query(f"SELECT source_partition, source_offset, error_class, error_message, source_key, length(raw) "
                    f"FROM dead_letters WHERE source_topic='{topic}' AND ({where}) ORDER BY source_offset").result_rows
    assert {(p, o) for p, o, *_ in rows} == {(p, o) for _, p, o in loop["poison"]}
    assert len(rows) == len(loop["poison"])  # each poison event dead-lettered exactly once
    assert sorted(c for _, _, c, *_ in rows) == ["InvalidEvent"] * 4 + ["UnknownFraming", "WrongSchema"]
    msgs = " ".join(m for _, _, _, m, *_ in rows)
    for reading_id in ("p-nan", "p-unknown", "p-unit", "p-request"):
        assert reading_id in msgs
    assert all(key == CID and n > 0 for *_, key, n in rows)  # the key and the raw bytes travel with it
    bad_smiles = ch.query(f"SELECT count() FROM dead_letters WHERE source_topic='{TOPICS['compounds'].name}' "
                          f"AND error_class='InvalidMolecule' AND source_key='{CID}'").result_rows[0][0]
    assert bad_smiles == 2


def test_readings_of_an_unknown_campaign_leave_no_state(loop: dict[str, Any], ch: Any, stack: Stack) -> None:
    where = " OR ".join(f"(source_topic='{t}' AND source_partition={p} AND source_offset={o})" for t, p, o in loop["ghost"])
    assert len(loop["ghost"]) == 2
    _settle(ch, f"SELECT count() FROM dead_letters WHERE {where}", 2)
    rows = ch.query(f"SELECT error_class, error_message, source_key, toUnixTimestamp64Milli(event_time) "
                    f"FROM dead_letters WHERE {where}").result_rows
    assert len(rows) == 2 and all(c == "InvalidEvent" and f"unknown campaign '{GHOST}'" in m and k == GHOST
                                  for c, m, k, _ in rows)
    # The worker made no runtime for the id: a checkpoint written after those dead letters names the
    # loop's campaign and not the ghost (each campaign the worker holds is in every checkpoint's index).
    after_ms = max(t for *_, t in rows)
    deadline = time.monotonic() + 3 * stack.settings.checkpoint_interval_s
    index: dict[str, Any] = {}
    while time.monotonic() < deadline:
        paths = list((stack.settings.data_dir / "checkpoints").glob("*/index.json"))
        index = json.loads(paths[0].read_bytes()) if paths else {}
        if index and index["written_at"] * 1000 > after_ms:
            break
        time.sleep(0.5)
    assert index and index["written_at"] * 1000 > after_ms, "no checkpoint written after the dead letters"
    assert CID in index["campaigns"] and GHOST not in index["campaigns"]


def test_create_tables_adds_columns_of_newer_schemas(tmp_path: Path) -> None:
    """An older data directory gains the columns a newer schema added, keeping its rows."""
    from labloop.consumers import connect, create_tables

    client = connect(f"chdb://{tmp_path / 'old'}", "labloop")
    client.command("CREATE TABLE model_updates (campaign_id String, model_version Int64) ENGINE = MergeTree "
                   "ORDER BY campaign_id")
    client.command("INSERT INTO model_updates VALUES ('c', 1)")
    create_tables(client)
    create_tables(client)  # idempotent
    cols = {r[0] for r in client.query("SELECT name FROM system.columns WHERE database = 'labloop' "
                                       "AND table = 'model_updates'").result_rows}
    assert {"n_readings", "done", "_offset"} <= cols
    assert client.query("SELECT campaign_id, n_readings FROM model_updates").result_rows == [("c", 0)]
    client.close()


def test_requests_record_what_their_model_had_seen(loop: dict[str, Any], ch: Any) -> None:
    """The audit trail: a request's trained_on watermarks select exactly the readings its model learned from."""
    reqs = ch.query(f"SELECT batch, model_version, trained_on FROM requests WHERE campaign_id='{CID}' "
                    f"ORDER BY sequence").result_rows
    assert all(tv == {} and mv == 0 for b, mv, tv in reqs if b == 0)
    completed = dict(ch.query(f"SELECT q.batch, count() FROM request_status s JOIN requests q USING (request_id) "
                              f"WHERE s.campaign_id='{CID}' AND s.status='COMPLETED' GROUP BY q.batch").result_rows)
    plates = TOPICS["plates"].name
    for batch in range(1, BUDGET // BATCH):
        _, mv, trained_on = next(r for r in reqs if r[0] == batch)
        assert mv >= batch
        seen = sum(ch.query(f"SELECT count() FROM readings WHERE campaign_id='{CID}' AND _topic='{plates}' "
                            f"AND _partition={key.rsplit(':', 1)[1]} AND _offset < {wm}").result_rows[0][0]
                   for key, wm in trained_on.items() if key.startswith(plates + ":"))
        assert seen == sum(n for b, n in completed.items() if b < batch)


def test_explain_a_request(loop: dict[str, Any], cli: Any, ch: Any) -> None:
    first, later = (ch.query(f"SELECT request_id FROM requests WHERE campaign_id='{CID}' AND batch={b} "
                             f"ORDER BY priority LIMIT 1").result_rows[0][0] for b in (0, 2))
    out = cli("explain", first)
    assert out.returncode == 0, out.stderr
    assert "chosen at random" in out.stdout
    out = cli("explain", later)
    assert out.returncode == 0, out.stderr
    assert "policy ucb" in out.stdout and "model v" in out.stdout and "gp on cpu" in out.stdout
    answered = ch.query(f"SELECT count() FROM request_status s JOIN requests q USING (request_id) WHERE "
                        f"s.campaign_id='{CID}' AND s.status='COMPLETED' AND q.batch < 2").result_rows[0][0]
    assert f"learned from {answered} readings" in out.stdout, out.stdout  # the batches answered before it
    assert "outcome: ACCEPTED, STARTED, COMPLETED" in out.stdout
    missing = cli("explain", "no-such-request")
    assert missing.returncode == 2 and "no request 'no-such-request'" in missing.stderr


def test_dead_letters_can_be_listed_shown_and_replayed_after_a_fix(loop: dict[str, Any], stack: Stack, cli: Any,
                                                                    codec: Codec, ch: Any) -> None:
    listing = cli("dlq", "list", "--topic", TOPICS["readings"].name)
    assert listing.returncode == 0, listing.stderr
    assert "InvalidEvent" in listing.stdout and "UnknownFraming" in listing.stdout
    unknown = next(f"{t}:{p}:{o}" for t, p, o in loop["poison"]
                   if "p-unknown" in ch.query(f"SELECT error_message FROM dead_letters WHERE source_topic='{t}' "
                                              f"AND source_partition={p} AND source_offset={o}").result_rows[0][0])
    shown = json.loads(cli("dlq", "show", unknown).stdout)
    assert shown["decoded"]["record"]["reading_id"] == "p-unknown"
    assert shown["errors"][0]["error_class"] == "InvalidEvent" and shown["key"] == CID

    # The fix: register the compound the reading was about; then replay just that dead letter.
    producer = make_producer(stack.kafka_config)
    publish_records(producer, codec, "compounds", "CompoundRegistered", iter([{
        "campaign_id": CID, "compound_id": "NO-SUCH-COMPOUND", "smiles": "CCO", "source": "fix", "event_time": 0,
        "ingest_time": 0}]))
    producer.close()
    mon = make_consumer(stack.kafka_config, "it-replay-monitor", **{"auto.offset.reset": "latest"})
    mon.subscribe([TOPICS["model_updates"].name])
    while not mon.assignment():
        mon.poll(0.1)
    before = loop["final"]["n_readings"]
    dry = cli("dlq", "replay", unknown, "--dry-run")
    assert f"would replay {unknown}" in dry.stdout
    applied = None
    for _ in range(4):  # the worker may still be featurizing the new compound: then replay again (idempotent)
        out = cli("dlq", "replay", unknown)
        assert out.returncode == 0 and "1 message(s) replayed" in out.stdout, out.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and applied is None:
            for m in mon.consume(100, 0.5):
                r = codec.decode(m.value()).record if not m.error() else None
                if r and r["campaign_id"] == CID and r["n_new"] > 0:
                    applied = r
        if applied is not None:
            break
    mon.close()
    assert applied is not None and applied["n_readings"] == before + 1


def test_unanswered_requests_expire_and_are_requeued(stack: Stack, codec: Codec, ch: Any) -> None:
    """No robot answers: requests expire after request_ttl_s, the compounds return to the pool, budget is kept."""
    cid = "expiry-it"
    producer = make_producer(stack.kafka_config)
    publish_records(producer, codec, "campaigns", "Campaign", iter([{
        "campaign_id": cid, "objective_assay_id": "tpsa", "direction": "MAXIMIZE", "unit": "A^2", "batch_size": 3,
        "init_size": 3, "budget": 6, "min_pool_size": 20, "policy": "ucb", "learner": "gp", "schedule": "ROUNDS",
        "request_ttl_s": 1.0, "seed": 0, "event_time": 0}]))
    rows = [r for r in compound_rows(DATA, cid) if not isinstance(r, Exception)][:20]
    publish_records(producer, codec, "compounds", "CompoundRegistered", iter(rows))
    producer.close()
    expired = _settle(ch, f"SELECT count() FROM request_status WHERE campaign_id='{cid}' AND status='EXPIRED'", 3, 60)
    assert expired >= 3
    assert _settle(ch, f"SELECT count() FROM requests WHERE campaign_id='{cid}'", 6, 30) >= 6  # re-issued
    n, ids = ch.query(f"SELECT count(), uniqExact(request_id) FROM requests WHERE campaign_id='{cid}'").result_rows[0]
    assert n == ids  # a re-issued request has a new id: robots act once per request_id
    reasons = ch.query(f"SELECT DISTINCT robot_id, reason FROM request_status WHERE campaign_id='{cid}' "
                       f"AND status='EXPIRED'").result_rows
    assert reasons == [("labloop-worker", "request_ttl_s elapsed")]

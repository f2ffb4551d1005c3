"""Bad Campaign events sent straight to Kafka: each is one dead letter, and nothing else breaks.

Every kind of bad definition is sent for a campaign of its own, followed by that campaign's
valid definition and by a second campaign behind it. Every one of those campaigns must
finish its budget through the real broker, worker, virtual lab and sink; then a replacement
worker rebuilds them all from Kafka and its checkpoint without an error. A reading of 1e308
is dead-lettered, and no prediction of that campaign is ever non-finite.
"""

from __future__ import annotations

import math
import time
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.kafka import make_consumer, make_producer
from labloop.consumers.publisher import compound_rows, publish_records
from labloop.schemas import TOPICS, Codec
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import Stack

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
POOL, BUDGET = 30, 4
BAD: dict[str, dict[str, Any]] = {
    "policy": {"policy": "no-such-policy"}, "learner": {"learner": "no-such-learner"}, "seed": {"seed": -1},
    "ttl-nan": {"request_ttl_s": math.nan}, "ttl-huge": {"request_ttl_s": 1e300}, "ttl-negative": {"request_ttl_s": -5.0},
    "batch-zero": {"batch_size": 0}, "budget-negative": {"budget": -1}, "batch-huge": {"batch_size": 10**7},
}
HUGE = "bad-learner"  # the campaign that also gets a reading of 1e308


def _spec(cid: str) -> CampaignSpec:
    return CampaignSpec(cid, "tpsa", "A^2", batch_size=2, init_size=2, budget=BUDGET, min_pool_size=POOL,
                        request_ttl_s=600.0, seed=1)


def _done(stack: Stack, codec: Codec, want: set[str], timeout_s: float = 240) -> set[str]:
    mon = make_consumer(stack.kafka_config, "poison-campaigns-monitor")
    mon.subscribe([TOPICS["model_updates"].name])
    done: set[str] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and done != want:
            stack.check()
            for m in mon.consume(500, 0.5):
                if not m.error():
                    r = codec.decode(m.value()).record
                    if r["done"] and r["campaign_id"] in want:
                        done.add(r["campaign_id"])
    finally:
        mon.close()
    return done


@pytest.fixture(scope="module")
def sent(stack: Stack, codec: Codec) -> dict[str, Any]:
    producer = make_producer(stack.kafka_config)
    pool = list(islice((r for r in compound_rows(DATA, "x") if not isinstance(r, Exception)), POOL))
    cids: list[str] = []
    for kind, change in BAD.items():
        bad, nxt = f"bad-{kind}", f"next-{kind}"
        # Straight to the topic, as a foreign producer would: Avro-valid, content wrong.
        raw = {**_spec(bad).to_record(0), **change}
        producer.produce(TOPICS["campaigns"].name, key=bad.encode(), value=codec.encode("Campaign", raw))
        publish_records(producer, codec, "campaigns", "Campaign", iter([_spec(bad).to_record(0), _spec(nxt).to_record(0)]))
        cids += [bad, nxt]
    for cid in cids:
        publish_records(producer, codec, "compounds", "CompoundRegistered", iter([{**r, "campaign_id": cid} for r in pool]))
    lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="poison-robot"),
                     Oracle.from_csv(DATA, "smiles", "tpsa"), LabConfig(unit="A^2", seed=2)).start()
    try:
        done = _done(stack, codec, set(cids))
    finally:
        lab.stop()
    # Beyond what any learner represents, for a campaign that is defined by now: dead-lettered, never learned.
    publish_records(producer, codec, "readings", "AssayReading", iter([{
        "reading_id": "huge-1", "campaign_id": HUGE, "compound_id": pool[-1]["compound_id"], "assay_id": "tpsa",
        "value": 1e308, "unit": "A^2", "qualifier": "EQ", "request_id": None, "instrument_id": "it",
        "event_time": 0, "ingest_time": 0}]))
    # A record of another schema on each readings topic, keyed by a defined campaign: dead-lettered as
    # WrongSchema live, and skipped by the replacement's replay (it once stopped the rebuild with a KeyError).
    for role in ("readings", "plates"):
        publish_records(producer, codec, role, "CompoundRegistered", iter([{**pool[0], "campaign_id": HUGE}]))
    producer.close()
    return {"cids": cids, "done": done}


def test_every_campaign_behind_a_bad_definition_finishes(sent: dict[str, Any], ch: Any, settle: Any) -> None:
    assert sent["done"] == set(sent["cids"])
    quoted = ",".join(f"'{c}'" for c in sent["cids"])
    n = settle(f"SELECT count() FROM requests WHERE campaign_id IN ({quoted})", BUDGET * len(sent["cids"]))
    assert n == BUDGET * len(sent["cids"])
    per = ch.query(f"SELECT campaign_id, uniqExact(request_id) FROM requests WHERE campaign_id IN ({quoted}) "
                   f"GROUP BY campaign_id").result_rows
    assert {c: k for c, k in per} == {c: BUDGET for c in sent["cids"]}


def test_each_bad_definition_is_one_named_dead_letter(sent: dict[str, Any], ch: Any, settle: Any) -> None:
    got = settle("SELECT count() FROM dead_letters WHERE source_topic = 'labloop.campaigns' "
                      "AND error_class = 'InvalidDefinition'", len(BAD))
    assert got == len(BAD)
    rows = ch.query("SELECT source_key, error_message FROM dead_letters WHERE source_topic = 'labloop.campaigns'").result_rows
    by_key = {k: msg for k, msg in rows}
    for kind, change in BAD.items():
        field = next(iter(change))
        assert field in by_key[f"bad-{kind}"], (kind, by_key[f"bad-{kind}"])


def test_a_reading_past_the_stable_bound_is_dead_lettered_and_predictions_stay_finite(sent: dict[str, Any], ch: Any, settle: Any) -> None:
    assert settle("SELECT count() FROM dead_letters WHERE error_message LIKE '%huge-1%plausible range%'", 1) == 1
    n, bad = ch.query(f"SELECT count(), countIf(NOT (isFinite(mean) AND isFinite(std))) FROM predictions "
                      f"WHERE campaign_id = '{HUGE}'").result_rows[0]
    assert n > 0 and bad == 0


def test_a_replacement_worker_rebuilds_them_all_without_error(sent: dict[str, Any], stack: Stack) -> None:
    log_path = stack.settings.data_dir / "logs" / "worker-0.log"
    before = log_path.stat().st_size
    stack.restart("worker-0")
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline and "rebuilt" not in text:
        stack.check()
        time.sleep(0.5)
        text = log_path.read_bytes()[before:].decode(errors="replace")
    assert "rebuilt" in text, text[-2000:]
    time.sleep(3)  # it must stay up consuming, too
    stack.check()
    text = log_path.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in text and "UnknownName" not in text, text[-3000:]

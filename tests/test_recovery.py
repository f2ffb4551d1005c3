"""A worker killed in the middle of a campaign: its replacement rebuilds the campaign from Kafka."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab, connect
from labloop.consumers.kafka import make_consumer, make_producer
from labloop.consumers.publisher import compound_rows, publish_records
from labloop.schemas import TOPICS, Codec
from labloop.streams.runtime import Stack, free_port
from labloop.streams.settings import Settings

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID, BUDGET, BATCH = "recovery-it", 60, 10


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("recovery"), clickhouse_http_port=free_port(),
                        log_level="info", sink_flush_s=0.2, checkpoint_interval_s=1.0)
    with Stack(settings) as s:
        yield s


def test_a_killed_worker_is_replaced_without_losing_or_doubling(own_stack: Stack, codec: Codec) -> None:
    stack = own_stack
    producer = make_producer(stack.kafka_config)
    publish_records(producer, codec, "campaigns", "Campaign", iter([{
        "campaign_id": CID, "objective_assay_id": "tpsa", "direction": "MAXIMIZE", "unit": "A^2", "batch_size": BATCH,
        "init_size": BATCH, "budget": BUDGET, "min_pool_size": 300, "policy": "ucb", "learner": "gp",
        "schedule": "ROUNDS", "request_ttl_s": 600.0, "seed": 5, "event_time": 0}]))
    publish_records(producer, codec, "compounds", "CompoundRegistered", compound_rows(DATA, CID))
    producer.close()
    lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="rec-robot"),
                     Oracle.from_csv(DATA, "smiles", "tpsa"), LabConfig(latency_s=0.5, unit="A^2")).start()
    mon = make_consumer(stack.kafka_config, "rec-monitor")
    mon.subscribe([TOPICS["model_updates"].name])
    killed, final = False, None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and final is None:
            for m in mon.consume(100, 0.5):
                r: Any = codec.decode(m.value()).record if not m.error() else None
                if not r or r["campaign_id"] != CID:
                    continue
                if not killed and r["n_requested"] >= 3 * BATCH:
                    worker = next(p for p in stack.procs if p.name == "worker-0")
                    worker.proc.send_signal(signal.SIGKILL)  # mid-campaign, no goodbye
                    worker.proc.wait()
                    stack.restart("worker-0")
                    killed = True
                if killed and r["done"]:
                    final = r
    finally:
        mon.close()
        lab.stop()
    assert killed and final is not None, "the campaign did not finish after the worker was replaced"
    ch = connect(stack.analyst_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        n, ids, compounds = ch.query(f"SELECT count(), uniqExact(request_id), uniqExact(compound_id) FROM requests "
                                     f"WHERE campaign_id='{CID}'").result_rows[0]
        if n >= BUDGET:
            break
        time.sleep(0.3)
    assert n == ids == compounds == BUDGET  # no request lost, doubled or repeated for a measured compound
    assert lab.robot.executions == BUDGET
    versions = ch.query(f"SELECT count(), uniqExact(model_version, done) FROM model_updates "
                        f"WHERE campaign_id='{CID}'").result_rows[0]
    assert versions[0] == versions[1]  # model versions continued, none reused
    assert ch.query(f"SELECT count() FROM dead_letters WHERE error_message LIKE '%{CID}%'").result_rows[0][0] == 0
    log = (stack.settings.data_dir / "logs" / "worker-0.log").read_text()
    # The replacement resumed from its predecessor's checkpoint plus the messages after it, not a fresh start.
    assert "loaded checkpoint of 1 campaign(s)" in log and "rebuilt 1 campaign(s) from a checkpoint and Kafka" in log


def _model_process_of(pid: int) -> int:
    """The pid of the worker's model process (its child running ``streams.modelhost``)."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if b"streams.modelhost" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError(f"worker {pid} has no model process")


def _reading(codec: Codec, rid: str, compound: str) -> bytes:
    return codec.encode("AssayReading", {
        "reading_id": rid, "campaign_id": CID, "compound_id": compound, "assay_id": "tpsa", "value": 50.0,
        "unit": "A^2", "qualifier": "EQ", "request_id": None, "instrument_id": "test", "event_time": 0,
        "ingest_time": 0})


def test_a_dead_model_process_takes_its_worker_down_and_the_replacement_fits(own_stack: Stack, codec: Codec) -> None:
    """Runs after the campaign above: with its model process gone a worker can neither fit nor
    checkpoint, so it exits (code 70) rather than run on without a model; its replacement
    restores the campaign and fits again."""
    stack = own_stack
    compound = next(r for r in compound_rows(DATA, CID) if isinstance(r, dict))["compound_id"]
    worker = next(p for p in stack.procs if p.name == "worker-0")
    os.kill(_model_process_of(worker.proc.pid), signal.SIGKILL)
    mon = make_consumer(stack.kafka_config, f"rec-model-{time.monotonic_ns()}", **{"auto.offset.reset": "latest"})
    mon.subscribe([TOPICS["model_updates"].name])
    deadline = time.monotonic() + 30
    while not mon.assignment() and time.monotonic() < deadline:
        mon.poll(0.2)
    producer = make_producer(stack.kafka_config)
    producer.produce(TOPICS["readings"].name, key=CID.encode(), value=_reading(codec, "model-proc-1", compound))
    producer.flush(10)
    assert worker.proc.wait(60) == 70
    assert "the model process died" in worker.log_path.read_text()
    stack.restart("worker-0")
    producer.produce(TOPICS["readings"].name, key=CID.encode(), value=_reading(codec, "model-proc-2", compound))
    producer.flush(10)
    learned = 0
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not learned:
            for m in mon.consume(100, 0.5):
                r: Any = codec.decode(m.value()).record if not m.error() else None
                if r and r["campaign_id"] == CID and r["n_new"] > 0:
                    learned = r["n_train"]
            stack.check()
    finally:
        mon.close()
        producer.close()
    assert learned > BUDGET  # the replacement fitted, on every reading so far


def test_a_replay_without_stop_offsets_reads_at_least_to_the_high_watermarks(broker: Any) -> None:
    """Idleness alone must not end a replay: with no idle time allowed at all, it still reads every
    partition to its high watermark (a restarted durable broker once took over a second to answer
    the first fetch, the replay ended with most requests unread, and they were issued again)."""
    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from labloop.streams.recovery import _read

    config = {"bootstrap.servers": broker.bootstrap}
    admin = AdminClient(config)
    for f in admin.create_topics([NewTopic("replay-floor", 3, 1)]).values():
        f.result(30)
    p = make_producer(config)
    for i in range(30_000):  # more than one consume() call returns
        p.produce("replay-floor", value=b"x" * 100, partition=i % 3)
        p.poll(0)
    p.flush(60)
    c = Consumer({**config, "group.id": "replay-floor", "enable.auto.commit": False, "fetch.wait.max.ms": 20})
    try:
        got = _read(c, [TopicPartition("replay-floor", part, 0) for part in range(3)], idle_s=0.0)
        highs = [c.get_watermark_offsets(TopicPartition("replay-floor", part), timeout=30)[1] for part in range(3)]
    finally:
        c.close()
    assert sum(highs) > 10_000 and len(got) >= sum(highs), (len(got), highs)


def test_requests_drawn_from_compounds_past_the_committed_offsets_are_re_adopted(codec: Codec) -> None:
    """A worker stopped just after its pool filled had issued requests from compounds that Faust had
    not committed yet (it commits on an interval, 2.8 s by its default). The replacement must know those compounds
    before it re-adopts the requests, or it issues the same ids again (seen in the SIGTERM
    durability test: the restarted worker re-sent its first batch)."""
    from confluent_kafka import Consumer, TopicPartition

    from labloop.models import FeatureSpec, featurize
    from labloop.streams.definition import CampaignSpec
    from labloop.streams.engine import CampaignEngine
    from labloop.streams.recovery import rebuild
    from labloop.streams.runtime import EmbeddedBroker, ensure_topics

    cid, group = "past-commit", "past-commit-worker"
    compounds = [r for r in compound_rows(DATA, cid) if isinstance(r, dict)][:40]
    smiles = [r["smiles"] for r in compounds]
    spec = CampaignSpec(cid, "tpsa", "A^2", batch_size=5, init_size=5, budget=20, min_pool_size=40, seed=3,
                        request_ttl_s=600.0)
    first = CampaignEngine(device="cpu")  # the worker that was stopped
    first.define(spec.to_record(0))
    first.register(cid, compounds, featurize(smiles))
    issued = [e.record for e in first.decide(cid, "cpu") if e.name == "ExperimentRequest"]
    assert len(issued) == 5
    with EmbeddedBroker() as broker:
        config = {"bootstrap.servers": broker.bootstrap}
        ensure_topics(config)
        p = make_producer(config)
        for role, name, recs in (("campaigns", "Campaign", [spec.to_record(0)]),
                                 ("compounds", "CompoundRegistered", compounds), ("requests", "ExperimentRequest", issued)):
            for r in recs:
                p.produce(TOPICS[role].name, value=codec.encode(name, r), partition=0)
        assert p.flush(30) == 0
        c = Consumer({**config, "group.id": group, "enable.auto.commit": False})
        try:  # Faust had committed the definition and only the first 2 of the 40 compounds
            c.commit(offsets=[TopicPartition(TOPICS["campaigns"].name, 0, 1), TopicPartition(TOPICS["compounds"].name, 0, 2)],
                     asynchronous=False)
        finally:
            c.close()
        second = CampaignEngine(device="cpu")
        stats = rebuild(second, config, group, codec, FeatureSpec())
    rt = second.get(cid)
    assert rt is not None and stats["compounds"] == 40 and stats["requests"] == 5
    assert sorted(rt.requests) == sorted(r["request_id"] for r in issued) and rt.n_requested == 5
    assert [e for e in second.decide(cid, "cpu") if e.name == "ExperimentRequest"] == []  # the batch is out already

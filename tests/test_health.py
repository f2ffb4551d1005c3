"""Health, readiness and metrics of the worker and the sink, scraped over HTTP from the running
stack and parsed with prometheus-client's own parser while a campaign runs."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.kafka import make_producer
from labloop.consumers.publisher import compound_rows, publish_records
from labloop.schemas import Codec
from labloop.streams.campaign import now_ms
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import Stack

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID = "health-it"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    code, text = _get(port, "/metrics")
    assert code == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _value(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_worker_and_sink_serve_health_readiness_and_moving_metrics(stack: Stack, codec: Codec, settle, ch) -> None:  # type: ignore[no-untyped-def]
    ports = stack.health_ports
    assert set(ports) >= {"worker-0", "sink"}, ports
    for port in ports.values():
        assert _get(port, "/healthz")[0] == 200
        deadline = time.monotonic() + 60
        while _get(port, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _get(port, "/readyz")[0] == 200, _get(port, "/readyz")
        assert _get(port, "/nothing")[0] == 404
    w0, s0 = _scrape(ports["worker-0"]), _scrape(ports["sink"])

    spec = CampaignSpec(CID, "tpsa", "A^2", batch_size=8, init_size=8, budget=24, min_pool_size=300, seed=3)
    p = make_producer(stack.kafka_config)
    publish_records(p, codec, "campaigns", "Campaign", iter([spec.to_record(now_ms())]))
    publish_records(p, codec, "compounds", "CompoundRegistered", compound_rows(DATA, CID))
    bad = {"reading_id": "health-bad", "campaign_id": CID, "compound_id": "not-in-the-pool", "assay_id": "tpsa",
           "value": 1.0, "unit": "A^2", "qualifier": "EQ", "request_id": None, "instrument_id": "x",
           "event_time": now_ms(), "ingest_time": now_ms()}
    publish_records(p, codec, "readings", "AssayReading", iter([bad]))
    lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="health-robot"),
                     Oracle.from_csv(DATA, "smiles", "tpsa"), LabConfig(latency_s=0.2, unit="A^2")).start()
    try:
        assert settle(f"SELECT countIf(done) FROM model_updates WHERE campaign_id = '{CID}'", 1, 180) >= 1
        time.sleep(3)  # the worker's next snapshot (every 2 s)
        w1, s1 = _scrape(ports["worker-0"]), _scrape(ports["sink"])
    finally:
        lab.stop()

    # Every series the service issue names is there, and the ones this campaign drives moved.
    for name in ("labloop_readings_total", "labloop_readings_per_second", "labloop_fit_seconds_bucket",
                 "labloop_fit_seconds_count", "labloop_predictions_total", "labloop_requests_total",
                 "labloop_requests_in_flight", "labloop_requests_expired_total", "labloop_requests_failed_total",
                 "labloop_dead_letters_total", "labloop_consumer_lag", "labloop_checkpoint_age_seconds",
                 "labloop_model_live", "labloop_model_version"):
        assert name in w1, (name, sorted(w1))
    for name in ("labloop_sink_rows_total", "labloop_sink_rows_per_second", "labloop_sink_insert_seconds_count",
                 "labloop_sink_duplicates_total", "labloop_consumer_lag"):
        assert name in s1, (name, sorted(s1))
    assert _value(w1, "labloop_readings_total") >= _value(w0, "labloop_readings_total") + 24
    assert _value(w1, "labloop_requests_total") >= _value(w0, "labloop_requests_total") + 24
    assert _value(w1, "labloop_predictions_total") >= _value(w0, "labloop_predictions_total") + 300
    assert _value(w1, "labloop_fit_seconds_count") > _value(w0, "labloop_fit_seconds_count")
    assert _value(w1, "labloop_dead_letters_total", error_class="InvalidEvent") >= \
        _value(w0, "labloop_dead_letters_total", error_class="InvalidEvent") + 1
    assert any(lab.get("campaign") == CID for lab, _ in w1["labloop_requests_in_flight"])  # the series exists...
    assert _value(w1, "labloop_requests_in_flight", campaign=CID) == 0  # ...and nothing is left in flight
    assert _value(w1, "labloop_model_live", campaign=CID, measure="n") >= 8  # readings scored before being learned
    assert _value(w1, "labloop_model_live", campaign=CID, measure="rmse") > 0
    assert _value(s1, "labloop_sink_rows_total", table="readings") > _value(s0, "labloop_sink_rows_total", table="readings")
    assert _value(s1, "labloop_sink_insert_seconds_count") > _value(s0, "labloop_sink_insert_seconds_count")

    # The analysts' views of the same campaign.
    row = ch.query(f"SELECT requested, in_flight, measured, budget, done, live_n > 0 FROM campaign_progress "
                   f"WHERE campaign_id = '{CID}'").result_rows
    assert row == [(24, 0, 24, 24, True, True)], row
    life = ch.query(f"SELECT count(), countIf(last_status = 'COMPLETED'), countIf(finished_at >= started_at "
                    f"AND started_at >= accepted_at AND accepted_at >= requested_at) FROM request_lifecycle "
                    f"WHERE campaign_id = '{CID}'").result_rows
    assert life == [(24, 24, 24)], life
    # Every compound's newest prediction comes from the final model (its predictions may land a moment
    # after its ModelUpdate: another topic).
    ok = settle(f"SELECT count() = 300 AND uniqExact(model_version) = 1 AND max(model_version) = (SELECT "
                f"max(model_version) FROM model_updates WHERE campaign_id = '{CID}') FROM latest_predictions "
                f"WHERE campaign_id = '{CID}'", 1, 30)
    assert ok == 1


def test_analysts_see_only_the_readings_the_loop_accepted(stack: Stack, codec: Codec, ch, settle) -> None:  # type: ignore[no-untyped-def]
    """The raw table keeps every reading as it arrived; ``accepted_readings`` leaves out the ones
    the worker dead-lettered, a whole plate's or single wells'."""
    cid = "accepted-it"
    spec = CampaignSpec(cid, "tpsa", "A^2", batch_size=4, init_size=4, budget=4, min_pool_size=300, seed=3)
    p = make_producer(stack.kafka_config)
    publish_records(p, codec, "campaigns", "Campaign", iter([spec.to_record(now_ms())]))
    pool = list(compound_rows(DATA, cid))
    publish_records(p, codec, "compounds", "CompoundRegistered", iter(pool))
    known = [r["compound_id"] for r in pool]
    settle(f"SELECT count() FROM compounds WHERE campaign_id = '{cid}'", 300, 60)
    time.sleep(2)  # the worker registers the pool before the readings below arrive
    t = now_ms()
    base = {"campaign_id": cid, "assay_id": "tpsa", "qualifier": "EQ", "request_id": None, "instrument_id": "x",
            "event_time": t, "ingest_time": t}
    singles = [{**base, "reading_id": "acc-good", "compound_id": known[0], "value": 50.0, "unit": "A^2"},
               {**base, "reading_id": "acc-unit", "compound_id": known[1], "value": 50.0, "unit": "nM"},
               {**base, "reading_id": "acc-unknown", "compound_id": "nowhere", "value": 50.0, "unit": "A^2"}]
    publish_records(p, codec, "readings", "AssayReading", iter(singles))
    wells = [{"reading_id": f"acc-w{i}", "compound_id": known[i + 2] if i != 1 else "nowhere", "well": f"A{i + 1:02d}",
              "value": 40.0 + i, "qualifier": "EQ", "request_id": None} for i in range(3)]
    plate = {"plate_id": "acc-plate", "campaign_id": cid, "assay_id": "tpsa", "unit": "A^2", "instrument_id": "x",
             "event_time": t, "ingest_time": t, "wells": wells}
    publish_records(p, codec, "plates", "PlateReadout", iter([plate]))
    ids = "('acc-good', 'acc-unit', 'acc-unknown', 'acc-w0', 'acc-w1', 'acc-w2')"
    assert settle(f"SELECT count() FROM readings WHERE reading_id IN {ids}", 6, 60) == 6  # all stored, as they came
    assert settle("SELECT count() FROM dead_letters WHERE has(rejected_ids, 'acc-unit') OR has(rejected_ids, 'acc-unknown') "
                  "OR has(rejected_ids, 'acc-w1')", 3, 60) == 3
    rows = ch.query(f"SELECT reading_id FROM accepted_readings WHERE reading_id IN {ids} ORDER BY reading_id").result_rows
    assert [r[0] for r in rows] == ["acc-good", "acc-w0", "acc-w2"]

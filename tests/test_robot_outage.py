"""A robot outlives its broker and its own death: results measured while the broker is away are
journaled, and arrive once it is back, also when the robot was SIGKILLed in between."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from labloop.consumers.kafka import make_consumer, make_producer
from labloop.schemas import TOPICS, Codec
from labloop.streams.runtime import EmbeddedBroker, ensure_topics

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
N = 6


def _requests(codec: Codec) -> list[dict[str, object]]:
    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))[:N]
    return [{"request_id": f"outage-r{i:07d}", "campaign_id": "outage", "compound_id": f"c{i}", "smiles": r["smiles"],
             "assay_id": "tpsa", "priority": 0, "sequence": i, "batch": 0, "policy": "ucb", "acquisition_score": None,
             "predicted_mean": None, "predicted_std": None, "model_version": 0, "trained_on": {}, "event_time": 0,
             "expires_at": 2**53} for i, r in enumerate(rows)]


def _journal(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:  # the line being written
                pass
    return out


def _wait(cond, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_results_survive_a_broker_outage_and_a_sigkilled_robot(tmp_path: Path, codec: Codec) -> None:
    broker = EmbeddedBroker(storage_dir=tmp_path / "broker", log_path=tmp_path / "broker.log").start()
    try:
        conf = {"bootstrap.servers": broker.bootstrap}
        ensure_topics(conf)
        p = make_producer(conf)
        for r in _requests(codec):
            p.produce(TOPICS["requests"].name, key=b"outage", value=codec.encode("ExperimentRequest", r))
        assert p.flush(10) == 0
        env = {**os.environ, "LABLOOP_KAFKA_BOOTSTRAP": broker.bootstrap, "LABLOOP_DATA_DIR": str(tmp_path / "data")}
        cmd = [sys.executable, "-m", "labloop.streams.cli", "robot", "--oracle", str(DATA), "--value-col", "tpsa",
               "--unit", "A^2", "--robot-id", "outage-robot", "--latency-s", "4", "--plate-size", "0"]
        journal = tmp_path / "data" / "robots" / "outage-robot.journal"
        err1 = open(tmp_path / "robot1.err", "w")  # noqa: SIM115
        robot = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err1)
        _wait(lambda: sum(e["t"] == "taken" for e in _journal(journal)) == N, 60, "the robot to take the requests")
        assert broker.proc is not None and broker.store is not None
        for proc in (broker.proc, broker.store):  # the broker goes away while the instrument measures
            proc.kill()
            proc.wait()
        _wait(lambda: sum(e["t"] == "out" and e["schema"] == "AssayReading" for e in _journal(journal)) == N, 30,
              "the results to be journaled")
        time.sleep(8)  # librdkafka retries all this time
        assert robot.poll() is None, "the robot died while its broker was away"
        err1.close()
        noise = (tmp_path / "robot1.err").read_text().splitlines()
        assert len(noise) < 40, noise[-40:]  # a few lines, not one per reconnect attempt
        robot.kill()  # and then the robot dies too, its results unacknowledged
        robot.wait()
        settled = {rid for e in _journal(journal) if e["t"] == "settled" for rid in e["requests"]}  # type: ignore[attr-defined]
        assert len(settled) < N  # some results were never acknowledged when it died

        broker.start()
        assert broker.bootstrap == env["LABLOOP_KAFKA_BOOTSTRAP"]  # the same address, so the robot needs no new setting
        again = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            c = make_consumer(conf, f"outage-check-{time.monotonic_ns()}")
            c.subscribe([TOPICS["readings"].name, TOPICS["status"].name])
            readings: list[str] = []
            statuses: dict[str, list[str]] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(set(readings)) < N or
                                                    sum("COMPLETED" in v for v in statuses.values()) < N):
                for m in c.consume(100, 0.5):
                    if m.error():
                        continue
                    d = codec.decode(m.value())
                    if d.name == "AssayReading":
                        readings.append(d.record["reading_id"])
                    else:
                        statuses.setdefault(d.record["request_id"], []).append(d.record["status"])
            c.close()
        finally:
            again.send_signal(signal.SIGINT)  # Ctrl-C: it prints what it did
            out2, err2 = again.communicate(timeout=30)
        assert sorted(set(readings)) == sorted(f"outage-r{i:07d}:outage-robot" for i in range(N)), (readings, err2)
        assert all("COMPLETED" in statuses.get(f"outage-r{i:07d}", []) for i in range(N)), statuses
        assert "sending again" in err2
        # Measured once: the restarted robot sent the journaled results again; it ran nothing again.
        assert "0 requests executed" in out2, out2
    finally:
        broker.stop()

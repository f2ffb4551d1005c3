"""A restart of the whole stack is a normal event: every process of `labloop up` and the robot
killed at once, twice, mid-campaign, and started again on the same data directory. The campaign
finishes with exactly its budget of distinct requests, each run once, and every reading stored
once. Real processes, real signals, the real broker, log and ClickHouse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from labloop.consumers.kafka import make_consumer
from labloop.schemas import TOPICS, Codec
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import free_port

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
BUDGET, BATCH = 40, 8
KILL_AT = (12, 28)  # requests issued when the first and the second kill come


def _labloop(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labloop.streams.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                parent[int(d.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _robot(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "labloop.streams.cli", "robot", "--oracle", str(DATA),
                                 "--value-col", "tpsa", "--unit", "A^2", "--robot-id", "durable-robot", "--latency-s",
                                 "0.5", "--plate-size", "4"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _reader(kafka: dict[str, str], *roles: str) -> Any:
    """A consumer of ``roles``' topics from their start, assigned (no group join: on Tansu that
    waits about half the session timeout, each time)."""
    from confluent_kafka import TopicPartition

    c = make_consumer(kafka, f"durable-reader-{time.monotonic_ns()}")
    c.assign([TopicPartition(TOPICS[r].name, p, 0) for r in roles for p in range(TOPICS[r].partitions)])
    return c


def _wait_requested(kafka: dict[str, str], codec: Codec, cid: str, at_least: int, timeout_s: float,
                    done: bool = False) -> dict[str, Any]:
    """The first model update of ``cid`` with ``n_requested >= at_least`` (and ``done``, if asked)."""
    c = _reader(kafka, "model_updates")
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for m in c.consume(200, 0.5):
                if m.error():
                    continue
                r = codec.decode(m.value()).record
                if r["campaign_id"] != cid:
                    continue
                last = r
                if r["n_requested"] >= at_least and (r["done"] or not done):
                    return r
    finally:
        c.close()
    raise AssertionError(f"{cid}: no model update with n_requested >= {at_least} (done={done}) within "
                         f"{timeout_s:.0f} s; last {last}")


def _kill_everything(up_pid: int, robot: subprocess.Popen[bytes], sig: int) -> None:
    family = [up_pid, *_descendants(up_pid), robot.pid]
    assert len(family) >= 6, family  # up, broker, object store, sink, worker, model process, robot
    for p in family:  # all at once, as a power cut (SIGKILL) or a host shutdown (SIGTERM) would
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    while time.monotonic() < t0 + 60 and [p for p in family if _alive(p)]:
        time.sleep(0.2)
    took = time.monotonic() - t0
    robot.wait(5)
    left = [p for p in family if _alive(p)]
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in left}
    # With the broker gone at once, the worker's and sink's last commits cannot finish: they exit
    # after STOP_GRACE_S (5 s) instead of waiting for the supervisor's kill 15 s later.
    assert took < 12, f"the stack took {took:.1f} s to stop"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_the_whole_stack_killed_twice_mid_campaign_resumes_exactly(tmp_path: Path, sig: int,
                                                                  define_campaign) -> None:  # type: ignore[no-untyped-def]
    cid = f"durable-{signal.Signals(sig).name.lower()}"
    data = tmp_path / "data"
    env = {**os.environ, "LABLOOP_DATA_DIR": str(data), "LABLOOP_CLICKHOUSE_HTTP_PORT": str(free_port()),
           "LABLOOP_DASHBOARD": "false", "LABLOOP_LOG_LEVEL": "info", "LABLOOP_CHECKPOINT_INTERVAL_S": "2",
           "COLUMNS": "200"}
    codec = Codec()
    robot: subprocess.Popen[bytes] | None = None
    try:
        up = _labloop(env, "up", "--detach")
        assert up.returncode == 0, up.stdout + up.stderr
        info = json.loads((data / "up.json").read_text())
        bootstrap = info["bootstrap"]
        kafka = {"bootstrap.servers": bootstrap}
        define_campaign(kafka, CampaignSpec(cid, "tpsa", "A^2", batch_size=BATCH, init_size=BATCH, budget=BUDGET,
                                            min_pool_size=300, request_ttl_s=600.0, seed=5), DATA)
        robot = _robot(env, tmp_path / "robot.log")
        for at in KILL_AT:
            _wait_requested(kafka, codec, cid, at, 180)
            _kill_everything(info["pid"], robot, sig)
            again = _labloop(env, "up", "--detach")  # the same data directory
            assert again.returncode == 0, again.stdout + again.stderr
            info = json.loads((data / "up.json").read_text())
            assert info["bootstrap"] == bootstrap  # clients need no new setting
            robot = _robot(env, tmp_path / "robot.log")
        final = _wait_requested(kafka, codec, cid, BUDGET, 300, done=True)
        assert final["n_requested"] == BUDGET and final["n_readings"] == BUDGET, json.dumps(final, default=str)

        # In the log: each request issued once, each reading measured once (a request run again would
        # carry a new measurement time; a result sent again after a crash carries the same one).
        c = _reader(kafka, "requests", "plates")
        requests: dict[str, int] = defaultdict(int)
        measured: dict[str, set[int]] = defaultdict(set)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(requests) < BUDGET or len(measured) < BUDGET):
            for m in c.consume(500, 0.5):
                if m.error():
                    continue
                d = codec.decode(m.value())
                if d.record["campaign_id"] != cid:
                    continue
                if d.name == "ExperimentRequest":
                    requests[d.record["request_id"]] += 1
                else:
                    for w in d.record["wells"]:
                        measured[w["reading_id"]].add(d.record["event_time"])
        time.sleep(2)
        for m in c.consume(500, 1.0):  # anything late
            if not m.error():
                d = codec.decode(m.value())
                if d.record["campaign_id"] == cid and d.name == "ExperimentRequest":
                    requests[d.record["request_id"]] += 1
        c.close()
        assert len(requests) == BUDGET and set(requests.values()) == {1}, dict(requests)
        assert len(measured) == BUDGET and all(len(t) == 1 for t in measured.values()), dict(measured)

        # In ClickHouse: every request and every reading exactly once.
        def sql(q: str) -> list[str]:
            out = _labloop(env, "sql", q, "--format", "csv")
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout.strip().splitlines()[-1:]

        deadline = time.monotonic() + 60
        want = [f"{BUDGET},{BUDGET}"]
        got: list[str] = []
        while time.monotonic() < deadline:
            got = sql(f"SELECT count(), uniqExact(request_id) FROM requests WHERE campaign_id = '{cid}'") + \
                sql(f"SELECT count(), uniqExact(reading_id) FROM readings WHERE campaign_id = '{cid}'")
            if got == want * 2:
                break
            time.sleep(1)
        assert got == want * 2, got
        log = (data / "logs" / "worker-0.log").read_text(errors="replace")
        assert "belongs to cluster" not in log  # the checkpoint was the same cluster's, every time

        # `labloop status`: this campaign done; a second one, whose robot is gone, running with requests out.
        robot.kill()
        robot.wait()
        define_campaign(kafka, CampaignSpec(f"{cid}-b", "tpsa", "A^2", batch_size=BATCH, init_size=BATCH, budget=BUDGET,
                                            min_pool_size=300, seed=6), DATA)
        deadline = time.monotonic() + 60
        shown = ""
        while time.monotonic() < deadline:
            st = _labloop(env, "status")
            shown = st.stdout
            lines = {ln.split()[1]: ln for ln in shown.splitlines() if ln.startswith("│ durable-")}
            if f"{cid}-b" in lines and "running" in lines[f"{cid}-b"] and f" {BATCH} " in lines[f"{cid}-b"]:
                break
            time.sleep(1)
        assert st.returncode == 0, st.stdout + st.stderr  # every component healthy
        lines = {ln.split()[1]: ln.split("│") for ln in shown.splitlines() if ln.startswith("│ durable-")}
        done_row, run_row = [c.strip() for c in lines[cid]], [c.strip() for c in lines[f"{cid}-b"]]
        assert done_row[2:7] == ["done", str(BUDGET), str(BUDGET), "0", str(BUDGET)], shown
        assert run_row[2:7] == ["running", str(BATCH), "0", str(BATCH), str(BUDGET)], shown
        for component in ("broker", "sink", "worker-0"):
            assert any(ln.startswith(f"│ {component} ") and "│ ok " in ln for ln in shown.splitlines()), shown
    finally:
        if robot is not None and robot.poll() is None:
            robot.kill()
        _labloop(env, "down", "--timeout-s", "30")

"""`labloop up` as a service: detached, one per data directory, children restarted when they die,
and none left behind when it dies itself. Real processes, killed with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.consumers.kafka import make_consumer
from labloop.schemas import TOPICS, Codec
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import free_port

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID, BUDGET, BATCH = "supervised-it", 40, 10


def _labloop(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labloop.streams.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _children(pid: int) -> dict[int, str]:
    """Live processes whose parent is ``pid``: pid -> command line."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid and stat.rsplit(")", 1)[1].split()[0] != "Z":
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _one(pid: int, what: str, other_than: int = 0, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [p for p, cmd in _children(pid).items() if what in cmd and p != other_than]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no {what!r} child of {pid} (other than {other_than}) within {timeout_s:.0f} s")


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {**os.environ, "LABLOOP_DATA_DIR": str(tmp_path / "data"), "LABLOOP_CLICKHOUSE_HTTP_PORT": str(free_port()),
         "LABLOOP_DASHBOARD_PORT": str(free_port()),
         "LABLOOP_LOG_LEVEL": "info", "LABLOOP_CHECKPOINT_INTERVAL_S": "1", "COLUMNS": "200"}
    yield e
    _labloop(e, "down", "--timeout-s", "30")  # whatever a failed test left running


def test_killed_worker_and_sink_come_back_under_labloop_up_and_the_campaign_finishes(
        env: dict[str, str], define_campaign) -> None:  # type: ignore[no-untyped-def]
    up = _labloop(env, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "labloop is up" in up.stdout
    info = json.loads((Path(env["LABLOOP_DATA_DIR"]) / "up.json").read_text())
    url = f"http://127.0.0.1:{env['LABLOOP_DASHBOARD_PORT']}/"
    assert info["dashboard"] == url and url in up.stdout  # the dashboard's address, printed
    assert "Campaigns" in urllib.request.urlopen(url, timeout=30).read().decode()
    second = _labloop(env, "up", timeout=60)
    assert second.returncode == 2 and "already running" in second.stderr and str(info["pid"]) in second.stderr
    kafka = {"bootstrap.servers": info["bootstrap"]}
    codec = Codec()
    define_campaign(kafka, CampaignSpec(CID, "tpsa", "A^2", batch_size=BATCH, init_size=BATCH, budget=BUDGET,
                                        min_pool_size=300, request_ttl_s=600.0, seed=4), DATA)
    worker = _one(info["pid"], "labloop.streams.cli worker")
    sink = _one(info["pid"], "labloop.streams.cli sink")
    lab = VirtualLab(RobotClient(kafka, codec, robot_id="supervised-robot"), Oracle.from_csv(DATA, "smiles", "tpsa"),
                     LabConfig(latency_s=0.3, unit="A^2")).start()
    mon = make_consumer(kafka, "supervised-monitor")
    mon.subscribe([TOPICS["model_updates"].name])
    killed: list[str] = []
    final: dict[str, Any] | None = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and final is None:
            for m in mon.consume(100, 0.5):
                r = codec.decode(m.value()).record if not m.error() else None
                if not r or r["campaign_id"] != CID:
                    continue
                if not killed and r["n_requested"] >= BATCH:
                    os.kill(worker, signal.SIGKILL)
                    killed.append("worker")
                    worker = _one(info["pid"], "labloop.streams.cli worker", other_than=worker)
                elif killed == ["worker"] and r["n_requested"] >= 2 * BATCH:
                    os.kill(sink, signal.SIGKILL)
                    killed.append("sink")
                    sink = _one(info["pid"], "labloop.streams.cli sink", other_than=sink)
                if r["done"]:
                    final = r
    finally:
        mon.close()
        lab.stop()
    assert killed == ["worker", "sink"] and final is not None, (killed, final)
    assert final["n_requested"] == BUDGET and lab.robot.executions == BUDGET
    log = (Path(env["LABLOOP_DATA_DIR"]) / "logs" / "up.log").read_text()
    assert "worker-0 exited with code -9; restarting it in" in log and "sink exited with code -9; restarting it in" in log
    everyone = [info["pid"], *_children(info["pid"])]
    down = _labloop(env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    time.sleep(1.0)
    assert not [p for p in everyone if _alive(p)]


def test_a_killed_labloop_up_leaves_no_orphans_and_starts_again(env: dict[str, str]) -> None:
    assert _labloop(env, "up", "--detach").returncode == 0
    info = json.loads((Path(env["LABLOOP_DATA_DIR"]) / "up.json").read_text())
    worker = _one(info["pid"], "labloop.streams.cli worker")
    _one(worker, "labloop.streams.modelhost")  # the worker's model process, a grandchild
    family = [*_children(info["pid"]), *_children(worker)]
    assert len(family) >= 4  # broker, sink, worker, model process
    os.kill(info["pid"], signal.SIGKILL)  # as a power cut of the supervisor alone would
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [p for p in family if _alive(p)]:
        time.sleep(0.2)
    assert not [p for p in family if _alive(p)], {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in family if _alive(p)}
    again = _labloop(env, "up", "--detach")  # the port, the lock and chDB's data directory are free again
    assert again.returncode == 0, again.stdout + again.stderr
    assert _labloop(env, "down").returncode == 0

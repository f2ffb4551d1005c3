"""Faults: the sink dies between an insert and its offset commit, and restarts.

With its exactly-once effect on, nothing is stored twice; the negative control (off)
must see the duplicates, or the test could not fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labloop.consumers import connect
from labloop.consumers.kafka import make_producer
from labloop.schemas import TOPICS, Codec
from labloop.streams.bench_stream import _plates
from labloop.streams.procs import STOP_GRACE_S
from labloop.streams.runtime import EmbeddedBroker, ensure_topics, free_port

N_PLATES, MORE, PLATE = 120, 40, 384


def _publish(broker: EmbeddedBroker, codec: Codec, n: int, tag: str) -> None:
    pools = {f"f{i}": ["C"] * 100 for i in range(4)}
    plates, _ = _plates(codec, pools, n * PLATE, PLATE, np.random.default_rng(len(tag)), tag)
    p = make_producer({"bootstrap.servers": broker.bootstrap})
    for cid, raw in plates:
        p.produce(TOPICS["plates"].name, key=cid.encode(), value=raw)
    p.flush(30)
    p.close()


@pytest.fixture()
def backlog(codec: Codec) -> Iterator[tuple[EmbeddedBroker, int]]:
    """A fresh broker holding 120 plates (46,080 readings) over 4 campaigns."""
    with EmbeddedBroker() as broker:
        ensure_topics({"bootstrap.servers": broker.bootstrap})
        _publish(broker, codec, N_PLATES, "f")
        yield broker, N_PLATES * PLATE


def _sink(broker: EmbeddedBroker, data: Path, port: int, *faults: str, **env: str) -> subprocess.Popen[bytes]:
    """A sink process; ``faults``: arguments of the fault-injecting sink (labloop.streams.faults)."""
    e = {**os.environ, "LABLOOP_KAFKA_BOOTSTRAP": broker.bootstrap, "LABLOOP_DATA_DIR": str(data),
         "LABLOOP_CLICKHOUSE_HTTP_PORT": str(port), "LABLOOP_SINK_BATCH_ROWS": "4000", "LABLOOP_SINK_FLUSH_S": "0.2",
         **{f"LABLOOP_{k.upper()}": v for k, v in env.items()}}
    module = "labloop.streams.faults" if faults else "labloop.streams.cli"
    return subprocess.Popen([sys.executable, "-m", module, "sink", *faults], env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _query_until(data: Path, port: int, sql: str, ok: Callable[[tuple[Any, ...]], bool],
                 timeout_s: float) -> tuple[Any, ...] | None:
    """The first row of ``sql`` on the sink serving ``port`` once ``ok(row)``; None at the deadline.
    Errors count as not yet: the sink may still be starting."""
    deadline, client = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            password = json.loads((data / "credentials.json").read_text())["analyst"]
            client = client or connect(f"http://analyst:{password}@127.0.0.1:{port}/labloop")
            row = tuple(client.query(sql).result_rows[0])
            if ok(row):
                return row
        except Exception:  # the sink is still starting
            pass
        time.sleep(0.3)
    return None


def _stored(data: Path, port: int, timeout_s: float) -> int:
    """Readings the sink serving ``port`` has stored, once it is more than none (0 at the deadline)."""
    row = _query_until(data, port, "SELECT count() FROM readings", lambda r: r[0] > 0, timeout_s)
    return int(row[0]) if row else 0


def _crash_then_recover(broker: EmbeddedBroker, tmp_path: Path, want: int, **env: str) -> tuple[int, int]:
    port = free_port()
    first = _sink(broker, tmp_path, port, "--crash-after-inserts", "1", **env)
    assert first.wait(90) == 17  # died right after its first insert, before committing its offsets
    # More plates arrive meanwhile: the restarted sink re-reads the first batch inside a larger one,
    # so neither a block hash nor a token can recognise it; only what is stored can.
    _publish(broker, Codec(), MORE, "g")
    want += MORE * PLATE
    second = _sink(broker, tmp_path, port, **env)
    sql = "SELECT count(), uniqExact(reading_id) FROM readings"
    try:
        if _query_until(tmp_path, port, sql, lambda r: r[1] >= want, 90) is None:
            raise AssertionError("the restarted sink did not store every reading")
        time.sleep(1.0)  # let a late duplicate show up if there is one
        row = _query_until(tmp_path, port, sql, lambda r: True, 30)
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        second.terminate()
        second.wait(20)


def test_a_crash_between_insert_and_commit_stores_nothing_twice(backlog: tuple[EmbeddedBroker, int],
                                                                tmp_path: Path) -> None:
    broker, want = backlog
    n, distinct = _crash_then_recover(broker, tmp_path, want)
    assert (n, distinct) == (want + MORE * PLATE, want + MORE * PLATE)


def test_negative_control_without_exactly_once_sees_duplicates(backlog: tuple[EmbeddedBroker, int],
                                                               tmp_path: Path) -> None:
    broker, want = backlog
    n, distinct = _crash_then_recover(broker, tmp_path, want, sink_exactly_once="false")
    total = want + MORE * PLATE
    assert distinct == total and n > total  # what was inserted before the crash was stored again


def test_a_sink_stops_within_its_grace_while_the_broker_is_frozen(codec: Codec, tmp_path: Path) -> None:
    """SIGTERM reaches a sink whose main thread waits in a synchronous offset commit to a broker
    that stopped answering (SIGSTOP): it exits after STOP_GRACE_S, not after the commit's
    request timeout (a minute), which is what Python's main-thread signal handling gave."""
    with EmbeddedBroker() as broker:
        ensure_topics({"bootstrap.servers": broker.bootstrap})
        feeding = threading.Event()
        feeding.set()

        def feed() -> None:  # a steady flow, so that an insert's commit is always about to be sent
            p = make_producer({"bootstrap.servers": broker.bootstrap})
            pools, k = {"s0": ["C"] * 100}, 0
            while feeding.is_set():
                for cid, raw in _plates(codec, pools, 4 * PLATE, PLATE, np.random.default_rng(k), f"s{k}")[0]:
                    p.produce(TOPICS["plates"].name, key=cid.encode(), value=raw)
                p.poll(0)
                k += 1
                time.sleep(0.05)
            p.flush(5)  # the broker may be frozen still: what it never acknowledged is dropped
            p.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        port = free_port()
        sink = _sink(broker, tmp_path, port)
        frozen = False
        try:
            assert _stored(tmp_path, port, 90) > 0, "the sink stored nothing"  # it has joined and inserts
            time.sleep(2.0)
            os.kill(broker.proc.pid, signal.SIGSTOP)
            frozen = True
            time.sleep(1.5)  # the next commit is sent and waits for an answer that does not come
            t0 = time.monotonic()
            sink.terminate()
            rc = sink.wait(STOP_GRACE_S + 25)
            took = time.monotonic() - t0
        finally:
            feeding.clear()
            if frozen:
                os.kill(broker.proc.pid, signal.SIGCONT)
            feeder.join(15)
            if sink.poll() is None:
                sink.kill()
                sink.wait(10)
        assert rc == 0
        assert took < STOP_GRACE_S + 5, f"the sink took {took:.1f} s to stop"

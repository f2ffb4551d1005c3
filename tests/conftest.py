"""Session fixtures: the real embedded broker, worker and chDB sink (no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labloop.schemas import Codec
from labloop.streams.runtime import EmbeddedBroker, Stack, free_port
from labloop.streams.settings import Settings

DATA = Path(__file__).parent / "data"

# Tansu answers a group join after about half the session timeout, and every stack a test starts
# joins several groups (worker, sink, robots), some of them again after each kill: 3 s instead of
# the default 6 took the durability and supervision tests from 229 to 196 s here. Set before any
# Settings is made; the stacks the tests start as subprocesses inherit it.
os.environ.setdefault("LABLOOP_KAFKA_SESSION_TIMEOUT_S", "3")


@pytest.fixture(scope="session")
def codec() -> Codec:
    return Codec()


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A bare Tansu broker for client-level tests (no worker, no sink)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Broker + topics + Faust worker + ClickHouse sink (chDB) serving HTTP on a free port."""
    data_dir = tmp_path_factory.mktemp("labloop")
    settings = Settings(data_dir=data_dir, clickhouse_http_port=free_port(), log_level="info",
                        worker_batch_window_s=0.1, sink_flush_s=0.2)
    with Stack(settings) as s:
        yield s


@pytest.fixture(scope="session")
def ch(stack: Stack):  # type: ignore[no-untyped-def]
    """An analyst's clickhouse-connect client over HTTP to the sink's chDB."""
    from labloop.consumers import connect

    return connect(stack.analyst_url)


@pytest.fixture(scope="session")
def settle(ch):  # type: ignore[no-untyped-def]
    """``settle(sql, want, timeout_s=30)``: poll a ``SELECT count()``-like query until it reaches
    ``want`` (the sink stores what the worker sent a moment later); returns the last value."""
    import time

    def run(sql: str, want: int, timeout_s: float = 30) -> int:
        got, deadline = -1, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = int(ch.query(sql).result_rows[0][0])
            if got >= want:
                break
            time.sleep(0.3)
        return got

    return run


@pytest.fixture(scope="session")
def cli(stack: Stack) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``labloop ARGS...`` as a user would, pointed at the session's stack."""
    env = {**os.environ, "LABLOOP_KAFKA_BOOTSTRAP": stack.bootstrap,
           "LABLOOP_CLICKHOUSE_HTTP_PORT": str(stack.settings.clickhouse_http_port),
           "LABLOOP_DATA_DIR": str(stack.settings.data_dir), "COLUMNS": "250"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "labloop.streams.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    return run


@pytest.fixture(scope="session")
def define_campaign(codec: Codec) -> Callable[..., None]:
    """``define_campaign(kafka_config, spec, csv)``: publish a campaign's definition, then its pool
    (``csv``'s ``smiles`` column), as a chemist's tools would."""
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import compound_rows, publish_records
    from labloop.streams.campaign import now_ms

    def run(kafka: dict[str, str], spec: object, csv: Path) -> None:
        producer = make_producer(kafka)
        publish_records(producer, codec, "campaigns", "Campaign", iter([spec.to_record(now_ms())]))  # type: ignore[attr-defined]
        publish_records(producer, codec, "compounds", "CompoundRegistered", compound_rows(csv, spec.campaign_id))  # type: ignore[attr-defined]
        producer.flush(30)

    return run


@pytest.fixture(scope="session")
def governed_registry() -> type:
    """A class: confluent-kafka's in-process mock Schema Registry, plus the compatibility levels
    it lacks (in 2.16.1 its ``set_config`` answers None and ``set_compatibility`` goes out over HTTP)."""
    from confluent_kafka.schema_registry._sync.mock_schema_registry_client import MockSchemaRegistryClient

    class GovernedMock(MockSchemaRegistryClient):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__({"url": "mock://labloop-test"})
            self.levels: dict[str, str] = {}

        def set_compatibility(self, subject_name: str | None = None, level: str | None = None) -> str:
            self.levels[subject_name or ""] = str(level)
            return str(level)

        def get_compatibility(self, subject_name: str | None = None) -> str:
            return self.levels.get(subject_name or "", "BACKWARD")

    return GovernedMock

"""Under a backlog: fits paced so that draining it keeps the cores, and a long fetch poll; neither otherwise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from labloop.consumers.kafka import make_producer
from labloop.schemas import TOPICS
from labloop.streams.faust_transport import set_fetch_max_wait
from labloop.streams.runtime import EmbeddedBroker, ensure_topics
from labloop.streams.settings import Settings
from labloop.streams.worker import IDLE_AFTER_S, create_app


def test_fits_are_paced_only_while_an_input_is_behind(tmp_path: Path) -> None:
    _, w = create_app(Settings(data_dir=tmp_path, backlog_messages=1000, backlog_fit_share=0.25), "127.0.0.1:9")
    assert not w.behind() and w._pace(0.1) == 0.0  # nothing measured yet
    w.lag[("labloop.readings", 0)] = 5000
    assert w.behind()
    assert w._pace(0.1) == pytest.approx(0.3)  # the fit took 0.1 s: at most a quarter of the time
    w.lag[("labloop.readings", 0)] = 1000  # caught up to the threshold
    assert not w.behind() and w._pace(0.1) == 0.0


def test_a_share_of_one_never_paces(tmp_path: Path) -> None:
    _, w = create_app(Settings(data_dir=tmp_path, backlog_fit_share=1.0), "127.0.0.1:9")
    w.lag[("labloop.plates", 2)] = 10**6
    assert w.behind() and w._pace(0.5) == 0.0


def test_the_fetch_long_poll_is_long_only_under_a_backlog(tmp_path: Path) -> None:
    _, w = create_app(Settings(data_dir=tmp_path, backlog_messages=1000, kafka_fetch_max_wait_ms=20,
                               kafka_fetch_max_wait_backlog_ms=500), "127.0.0.1:9")
    assert w.fetch_wait_ms() == 20
    w.lag[("labloop.readings", 1)] = 1001
    assert w.fetch_wait_ms() == 500
    w.lag[("labloop.readings", 1)] = 0
    assert w.fetch_wait_ms() == 20


def test_the_long_poll_lengthens_on_an_idle_worker_and_shortens_at_its_next_input(tmp_path: Path) -> None:
    _, w = create_app(Settings(data_dir=tmp_path, backlog_messages=1000, kafka_fetch_max_wait_ms=20,
                               kafka_fetch_max_wait_backlog_ms=500, kafka_fetch_max_wait_idle_ms=200), "127.0.0.1:9")
    assert w.fetch_wait_ms() == 20  # just started: live
    w._input_at -= IDLE_AFTER_S + 0.1
    assert w.fetch_wait_ms() == 200
    w.saw_input()  # a batch of any input
    assert w.fetch_wait_ms() == 20
    w._input_at -= IDLE_AFTER_S + 0.1
    w.lag[("labloop.readings", 0)] = 5000  # a backlog measured before the quiet keeps the backlog's poll
    assert w.fetch_wait_ms() == 500


def test_the_long_poll_waits_for_a_started_consumer(tmp_path: Path) -> None:
    app, _ = create_app(Settings(data_dir=tmp_path), "127.0.0.1:9")
    assert set_fetch_max_wait(app, 500) is False  # no fetcher yet: the worker tries again after its next batch


def test_the_long_poll_reaches_a_running_aiokafka_fetcher(broker: EmbeddedBroker) -> None:
    """The path the worker sets (Faust's consumer thread -> aiokafka consumer -> fetcher), on a
    real consumer of the embedded broker; the next fetches then use the new wait."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    conf = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(conf)
    topic = TOPICS["status"].name

    async def run() -> tuple[bool, int, bytes]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id="long-poll-test",
                                    auto_offset_reset="latest", fetch_max_wait_ms=20, session_timeout_ms=6000)
        await consumer.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while not consumer.assignment():
                assert asyncio.get_running_loop().time() < deadline, "no partitions assigned within 30 s"
                await asyncio.sleep(0.05)
            app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_consumer=consumer)))
            ok = set_fetch_max_wait(app, 321)
            await asyncio.sleep(0.5)  # past the partition position lookup
            p = make_producer(conf)
            p.produce(topic, key=b"k", value=b"after")
            p.flush(10)
            got = await asyncio.wait_for(consumer.getone(), 10)
            return ok, consumer._fetcher._fetch_max_wait_ms, got.value
        finally:
            await consumer.stop()

    assert asyncio.run(run()) == (True, 321, b"after")

"""Faust's aiokafka transport with a configurable fetch wait.

Faust hard-codes ``fetch_max_wait_ms=1500`` for its consumer. Kafka answers a
long-poll fetch as soon as data arrives, but Tansu holds it for the whole wait
(measured: a message produced into an idle topic reaches an aiokafka consumer
after ~615 ms with a 1500 ms wait, ~115 ms with 500, ~17 ms with 100, ~5 ms with
20). That wait would be every reading's latency, so labloop's worker uses this
transport (URL scheme ``labloop://``) and sets the wait from its settings.
"""

from __future__ import annotations

import logging
from typing import Any

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as _faust_aiokafka

__all__ = ["SCHEME", "Transport", "set_fetch_max_wait"]

log = logging.getLogger(__name__)

SCHEME = "labloop"
DEFAULT_FETCH_MAX_WAIT_MS = 1500


class _ConsumerThread(_faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this attribute when it builds its fetcher in start(), after this point.
        consumer._fetch_max_wait_ms = int(getattr(self.consumer.app, "labloop_fetch_max_wait_ms",
                                                  DEFAULT_FETCH_MAX_WAIT_MS))
        return consumer


class Consumer(_faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(_faust_aiokafka.Transport):
    Consumer = Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"


def set_fetch_max_wait(app: Any, ms: int) -> bool:
    """Set the long-poll of ``app``'s consumer for its next fetch requests (aiokafka builds every
    request from its fetcher's ``_fetch_max_wait_ms``; a request in flight keeps its wait).
    Returns False when the consumer has not started yet."""
    thread = getattr(app.consumer, "_thread", None)
    consumer = getattr(thread, "_consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None:
        return False
    if not hasattr(fetcher, "_fetch_max_wait_ms"):  # another aiokafka: say so once, keep the wait it has
        if not _warned:
            log.warning("aiokafka's fetcher has no _fetch_max_wait_ms: the fetch long-poll stays as started")
            _warned.append(True)
        return False
    fetcher._fetch_max_wait_ms = int(ms)
    return True


_warned: list[bool] = []

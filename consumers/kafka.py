"""confluent-kafka clients with settings that suit both Tansu and real Kafka."""

from __future__ import annotations

import logging
import re
import time

from confluent_kafka import Consumer, Producer

__all__ = ["KAFKA_LOG", "make_consumer", "make_producer"]


class _OncePer(logging.Filter):
    """Lets one record of a kind through per ``every_s`` seconds, with a count of the ones held back.

    librdkafka reports every failed reconnect, 20 a second while a broker is away; a client's
    log should say once that the broker is unreachable, and again now and then, not flood.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"\d+", "#", record.getMessage())[:200]
        now = time.monotonic()
        last, held = self._last.get(kind, (-1e9, 0))
        if now - last < self.every_s:
            self._last[kind] = (last, held + 1)
            return False
        self._last[kind] = (now, 0)
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more like it in the last {now - last:.0f} s)", ()
        return True


#: The logger confluent-kafka clients of labloop report through (``logger=KAFKA_LOG``), rate-limited.
KAFKA_LOG = logging.getLogger("labloop.kafka")
KAFKA_LOG.addFilter(_OncePer())


def make_producer(kafka_config: dict[str, str], **extra: str | int) -> Producer:
    """An idempotent-enough, batching producer: ``acks=all``, 5 ms linger, lz4."""
    conf: dict[str, str | int] = {**kafka_config, "acks": "all", "linger.ms": 5, "compression.type": "lz4",
                                  "enable.idempotence": False, "queue.buffering.max.messages": 500_000}
    conf.update(extra)
    return Producer(conf)


def make_consumer(kafka_config: dict[str, str], group_id: str, session_timeout_s: float = 6.0,
                  **extra: str | int) -> Consumer:
    """A manually-committing consumer that starts from the earliest offset.

    A short session timeout matters on Tansu, whose group join waits about half of it.
    """
    conf: dict[str, str | int] = {**kafka_config, "group.id": group_id, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "session.timeout.ms": int(session_timeout_s * 1000),
                                  "heartbeat.interval.ms": max(100, int(session_timeout_s * 1000 / 4)),
                                  "fetch.wait.max.ms": 20}  # Tansu holds a fetch for the whole wait
    conf.update(extra)
    return Consumer(conf)

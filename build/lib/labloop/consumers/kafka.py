"""confluent-kafka clients with settings that suit both Tansu and real Kafka."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer

__all__ = ["make_consumer", "make_producer"]


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

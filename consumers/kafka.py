"""confluent-kafka clients with settings that suit both Tansu and real Kafka."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from labloop.consumers.errors import ConsumerError

__all__ = ["KAFKA_LOG", "BrokerAuthFailed", "BrokerUnreachable", "GroupConsumer", "check_broker", "make_consumer",
           "make_producer"]


class BrokerAuthFailed(ConsumerError):
    """The broker refused this client's credentials or certificate (SASL or TLS)."""


class BrokerUnreachable(ConsumerError):
    """No broker answered within the time allowed."""


# librdkafka's codes for a refused login or certificate; each is final for these credentials.
_AUTH_CODES = {KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED,
               KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED}


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
    """A batching producer that keeps order: ``acks=all``, 5 ms linger, lz4, one request in flight
    per broker.

    One request in flight means that a retry can never reorder a partition (there is no
    idempotent producer to do it), and that messages gather into the next batch while the broker
    writes the last one. On the durable embedded broker, with librdkafka's default of pipelined
    requests, a consumer 1,000 messages/s behind a producer fell further behind every second
    (p50 0.5 s over 8 s, and rising); with one in flight it kept up at p50 79 / p99 158 ms,
    with about as many batches stored (measured here).
    """
    conf: dict[str, str | int] = {**kafka_config, "acks": "all", "linger.ms": 5, "compression.type": "lz4",
                                  "enable.idempotence": False, "queue.buffering.max.messages": 500_000,
                                  "max.in.flight.requests.per.connection": 1}
    conf.update(extra)
    return Producer(conf)


Rebalance = Callable[[Any, list[Any]], None]


class GroupConsumer(Consumer):
    """A ``confluent_kafka.Consumer`` that leaves its group only once it has joined.

    Tansu (0.6.0, and its main branch as read) keeps a member that leaves while the group is
    still forming as the group's leader: every member that joins later waits on that leader
    until the broker restarts. A robot stopped within the few seconds of its first join left
    its fleet's group taking no requests (measured here: a second consumer of the group got
    none of 5 messages in 120 s; after a join completed first, all 5 in 3.2 s; after a restart
    of the durable broker, all 5 in 3.4 s). So :meth:`close` first waits, for at most
    ``join_wait_s``, until the group has given this consumer its partitions. A killed consumer
    sends no leave and is dropped at its session timeout, which Tansu handles.
    """

    def __init__(self, conf: dict[str, str | int], join_wait_s: float) -> None:
        super().__init__(conf)
        self.join_wait_s = join_wait_s
        self._subscribed = False
        self._joined = False

    def subscribe(self, topics: Sequence[str], on_assign: Rebalance | None = None,
                  on_revoke: Rebalance | None = None, on_lost: Rebalance | None = None) -> None:
        """``Consumer.subscribe``, tracking whether this member holds an assignment."""
        def assigned(consumer: Any, partitions: list[Any]) -> None:
            self._joined = True
            if on_assign is not None:
                on_assign(consumer, partitions)

        def revoked(consumer: Any, partitions: list[Any]) -> None:
            self._joined = False  # rejoining: the group is forming again
            if on_revoke is not None:
                on_revoke(consumer, partitions)

        extra = {} if on_lost is None else {"on_lost": on_lost}
        self._subscribed = True
        super().subscribe(list(topics), on_assign=assigned, on_revoke=revoked, **extra)

    def close(self) -> None:
        """Wait for a join in progress (at most ``join_wait_s``), then leave the group and close.
        Messages fetched during the wait are dropped uncommitted: the group delivers them again."""
        deadline = time.monotonic() + self.join_wait_s
        while self._subscribed and not self._joined and time.monotonic() < deadline:
            self.consume(500, 0.1)  # serves the rebalance callbacks
        super().close()


def make_consumer(kafka_config: dict[str, str], group_id: str, session_timeout_s: float = 6.0,
                  **extra: str | int) -> GroupConsumer:
    """A manually-committing consumer that starts from the earliest offset.

    A short session timeout matters on Tansu, whose group join waits about half of it. Its
    :meth:`GroupConsumer.close` waits up to two session timeouts for a join in progress.
    """
    conf: dict[str, str | int] = {**kafka_config, "group.id": group_id, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "session.timeout.ms": int(session_timeout_s * 1000),
                                  "heartbeat.interval.ms": max(100, int(session_timeout_s * 1000 / 4)),
                                  "fetch.wait.max.ms": 20}  # Tansu holds a fetch for the whole wait
    conf.update(extra)
    return GroupConsumer(conf, join_wait_s=2 * session_timeout_s)


def check_broker(kafka_config: dict[str, str], timeout_s: float = 15.0) -> str:
    """Connect once with ``kafka_config`` and return the cluster id; the first thing each client
    of labloop does, so that wrong credentials end it at once instead of in endless reconnects.

    Raises:
        BrokerAuthFailed: the broker refused the SASL credentials or the TLS handshake failed
            (the message names the user and the broker, never the password).
        BrokerUnreachable: nothing answered within ``timeout_s``.
    """
    errors: list[KafkaError] = []
    conf = {**kafka_config, "error_cb": errors.append, "logger": _QUIET, "reconnect.backoff.ms": 200}
    admin = AdminClient(conf)  # type: ignore[arg-type]
    who = f"{kafka_config.get('sasl.username') or 'client'} at {kafka_config.get('bootstrap.servers')}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                return admin.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic()))).cluster_id or ""
            except KafkaException as exc:
                last = exc.args[0] if exc.args else None
            admin.poll(0)  # delivers error_cb
            for e in errors + ([last] if isinstance(last, KafkaError) else []):
                if e.code() in _AUTH_CODES or "SASL authentication error" in e.str() or "SSL handshake" in e.str():
                    raise BrokerAuthFailed(f"the broker refused {who}: {e.str()}")
            if time.monotonic() >= deadline:
                raise BrokerUnreachable(f"no broker answered {who} within {timeout_s:.0f} s")
    finally:
        del admin


_QUIET = logging.getLogger("labloop.kafka.check")
_QUIET.addFilter(lambda record: False)  # check_broker reports through its exception, not librdkafka's lines

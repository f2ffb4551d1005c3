"""The long-running services behind the CLI's hidden ``worker`` and ``sink`` commands."""

from __future__ import annotations

import logging
import os
from typing import NoReturn

from labloop.consumers import ClickHouseSink, HttpBridge, connect, create_tables
from labloop.consumers.health import HealthServer
from labloop.consumers.kafka import check_broker
from labloop.consumers.sink import InsertHook
from labloop.streams.procs import StopSignal
from labloop.streams.runtime import RuntimeFailure
from labloop.streams.settings import Settings

__all__ = ["run_sink"]

log = logging.getLogger("labloop.sink")


def run_sink(settings: Settings, on_insert: InsertHook | None = None) -> NoReturn:
    """Run the ClickHouse sink until SIGTERM or Ctrl-C, then end the process (status 0); serves
    ClickHouse's HTTP interface on loopback when ClickHouse is the embedded chDB. ``on_insert``:
    fault injection (tests only)."""
    if settings.embedded_kafka:
        raise RuntimeFailure("the sink needs a broker: set LABLOOP_KAFKA_BOOTSTRAP (`labloop up` does)")
    s = settings
    sigterm = StopSignal("sink")  # first: a stop during the start below must not wait for it either
    check_broker(s.kafka_config(), 30)  # wrong credentials: a named error now, not reconnects forever
    client = connect(s.clickhouse_target, s.clickhouse_database)
    create_tables(client, cluster=s.clickhouse_cluster)
    codec = s.codec()
    snk = ClickHouseSink(client, s.kafka_config(), codec, batch_rows=s.sink_batch_rows, flush_s=s.sink_flush_s,
                         session_timeout_s=s.kafka_session_timeout_s, exactly_once=s.sink_exactly_once,
                         dedup_keys=s.sink_dedup_keys, on_insert=on_insert,
                         replicated=s.clickhouse_cluster is not None)
    bridge = HttpBridge(s.clickhouse_target.removeprefix("chdb://"), s.clickhouse_http_port, s.clickhouse_database,
                        s.http_passwords(), timeout_s=s.clickhouse_analyst_timeout_s).start() \
        if s.embedded_clickhouse else None
    health = HealthServer(s.health_port, snk.metrics.registry, lambda: (
        snk.metrics.assigned > 0, f"{snk.metrics.assigned} partition(s) assigned" if snk.metrics.assigned
        else "waiting for the consumer group to assign partitions"), stale_s=30.0).start()
    log.warning("health and metrics on http://127.0.0.1:%d/metrics", health.port)
    snk.on_tick = health.tick

    sigterm.arm(snk.stop)
    try:
        snk.run()
    except KeyboardInterrupt:
        pass
    finally:
        health.stop()
        if bridge:
            bridge.stop()
        client.close()
    log.info("sink: stopped")
    # The process ends here, not in interpreter finalization: a sink stopped by SIGTERM, its
    # consumer and ClickHouse client already closed, once hung there for good (Python's own
    # signal handlers already removed, py-spy finding no interpreter; which native library's exit
    # handler held it was not found), and whoever stopped it waited in vain.
    logging.shutdown()
    os._exit(0)

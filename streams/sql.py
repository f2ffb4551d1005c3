"""Analyst access: one function that finds the ClickHouse the settings point at."""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from labloop.consumers import connect
from labloop.streams.runtime import port_in_use
from labloop.streams.settings import Settings

__all__ = ["analyst_client"]


def analyst_client(settings: Settings) -> Client:
    """A client for queries.

    With embedded chDB: the running sink's HTTP bridge when ``labloop up`` (or a
    demo) owns the data directory, else chDB opened in this process. Otherwise
    the configured ClickHouse server.
    """
    if settings.embedded_clickhouse:
        if port_in_use(settings.clickhouse_http_port):
            return connect(f"http://127.0.0.1:{settings.clickhouse_http_port}/{settings.clickhouse_database}")
        client = connect(settings.clickhouse_target, settings.clickhouse_database)
        return client
    return connect(settings.clickhouse_target, settings.clickhouse_database)

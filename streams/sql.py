"""Analyst access: one function that finds the ClickHouse the settings point at."""

from __future__ import annotations

import socket

from clickhouse_connect.driver.client import Client

from consumers import connect
from streams.settings import Settings

__all__ = ["analyst_client"]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.3).close()
        return True
    except OSError:
        return False


def analyst_client(settings: Settings) -> Client:
    """A client for queries.

    With embedded chDB: the running sink's HTTP bridge when ``labloop up`` (or a
    demo) owns the data directory, else chDB opened in this process. Otherwise
    the configured ClickHouse server.
    """
    if settings.embedded_clickhouse:
        if _listening(settings.clickhouse_http_port):
            return connect(f"http://127.0.0.1:{settings.clickhouse_http_port}/{settings.clickhouse_database}")
        client = connect(settings.clickhouse_target, settings.clickhouse_database)
        return client
    return connect(settings.clickhouse_target, settings.clickhouse_database)

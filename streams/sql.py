"""Analyst access: one function that finds the ClickHouse the settings point at."""

from __future__ import annotations

from urllib.parse import quote

from clickhouse_connect.driver.client import Client

from labloop.consumers import connect
from labloop.streams.runtime import port_in_use
from labloop.streams.settings import Settings

__all__ = ["analyst_client", "bridge_url"]


def bridge_url(settings: Settings, role: str = "analyst") -> str:
    """The embedded HTTP interface's URL with ``role``'s credentials (``analyst`` or ``operator``)."""
    password = quote(settings.http_passwords()[role], safe="")
    return f"http://{role}:{password}@127.0.0.1:{settings.clickhouse_http_port}/{settings.clickhouse_database}"


def analyst_client(settings: Settings, operator: bool = False) -> Client:
    """A client for queries (``operator``: for schema work, through the operator's credentials).

    With embedded chDB: the running sink's HTTP bridge when ``labloop up`` (or a
    demo) owns the data directory, else chDB opened in this process. Otherwise
    the configured ClickHouse server.
    """
    if settings.embedded_clickhouse:
        if port_in_use(settings.clickhouse_http_port):
            return connect(bridge_url(settings, "operator" if operator else "analyst"))
        client = connect(settings.clickhouse_target, settings.clickhouse_database)
        return client
    return connect(settings.clickhouse_target, settings.clickhouse_database)

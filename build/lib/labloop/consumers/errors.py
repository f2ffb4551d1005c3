"""Errors of the downstream clients."""

from __future__ import annotations

from labloop.schemas import LabloopError


class ConsumerError(LabloopError):
    """Root of errors raised by :mod:`consumers`."""


class BadRow(ConsumerError):
    """A CSV row that cannot become an event; ``row`` is its 1-based line number."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row = row
        self.reason = reason


class SinkError(ConsumerError):
    """ClickHouse refused an insert or a DDL statement."""

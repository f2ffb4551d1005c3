"""Downstream (and upstream) clients: ClickHouse sink, robots, virtual lab, LIMS publisher."""

from labloop.consumers.bridge import HttpBridge
from labloop.consumers.errors import BadRow, ConsumerError, SinkError
from labloop.consumers.robot import Measurement, RobotClient
from labloop.consumers.sink import ClickHouseSink
from labloop.consumers.tables import connect, create_tables
from labloop.consumers.virtual_lab import LabConfig, Oracle, VirtualLab

__all__ = [
    "BadRow", "ClickHouseSink", "ConsumerError", "HttpBridge", "LabConfig", "Measurement", "Oracle", "RobotClient",
    "SinkError", "VirtualLab", "connect", "create_tables",
]

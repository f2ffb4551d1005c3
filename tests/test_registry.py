"""Schema Registry, governed: `labloop topics` registers every schema version in history order and
sets BACKWARD_TRANSITIVE per subject; producers may run with auto-registration off; and a real
third-party client (Debian's kcat, in test_kafka_security.py) reads the Confluent-framed topics."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from labloop.schemas import Codec, SchemaError
from labloop.streams.runtime import EmbeddedBroker

STATUS = {"request_id": "r-kcat", "campaign_id": "c", "compound_id": "x", "status": "ACCEPTED", "robot_id": "bot",
          "reason": None, "event_time": 1_700_000_000_000}


def test_labloop_topics_registers_every_version_in_order_and_sets_backward_transitive(
        broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch, governed_registry: Any) -> None:
    from typer.testing import CliRunner

    from labloop.streams.cli import app

    registry = governed_registry()
    monkeypatch.setattr(SchemaRegistryClient, "new_client", staticmethod(lambda conf: registry))
    env = {"LABLOOP_KAFKA_BOOTSTRAP": broker.bootstrap, "LABLOOP_SCHEMA_REGISTRY_URL": "mock://labloop-test",
           "COLUMNS": "200"}
    res = CliRunner().invoke(app, ["topics"], env=env)
    assert res.exit_code == 0, res.output
    codec = Codec()
    subjects = registry.get_subjects()
    assert sorted(subjects) == sorted(codec.schema(n).name for n in codec.names)
    for name in codec.names:
        subject = codec.schema(name).name
        assert registry.get_compatibility(subject) == "BACKWARD_TRANSITIVE"
        versions = codec.versions(name)
        assert sorted(registry.get_versions(subject)) == list(range(1, len(versions) + 1))
        for i, source in enumerate(versions, 1):  # history order: v1 first, the current one last
            assert registry.get_version(subject, i).schema.schema_str == source
        assert subject in res.output
    assert len(registry.get_versions("labloop.ModelUpdate")) == 3  # v1, v2, v3 (the current one)
    again = CliRunner().invoke(app, ["topics"], env=env)  # idempotent: nothing new the second time
    assert again.exit_code == 0 and len(registry.get_versions("labloop.ModelUpdate")) == 3


def test_with_auto_registration_off_a_producer_only_writes_governed_schemas(governed_registry: Any) -> None:
    registry = governed_registry()
    producer_side = Codec(registry=registry, auto_register=False)
    with pytest.raises(SchemaError, match="not registered and auto-registration is off"):
        producer_side.encode("RequestStatus", STATUS)
    assert registry.get_subjects() == []  # the failed write registered nothing
    Codec(registry=registry).govern()
    raw = producer_side.encode("RequestStatus", STATUS)
    sid = registry.lookup_schema("labloop.RequestStatus", _schema(Codec().schema("RequestStatus").source)).schema_id
    assert raw[:5] == b"\x00" + struct.pack(">I", sid)
    assert Codec(registry=registry).decode(raw).record == STATUS


def _schema(source: str) -> Any:
    from confluent_kafka.schema_registry import Schema

    return Schema(source, "AVRO")

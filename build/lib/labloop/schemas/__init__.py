"""Avro contracts of labloop: the schemas, the codec, the topic catalogue."""

from labloop.schemas.codec import SCHEMA_DIR, Codec, Decoded
from labloop.schemas.errors import DecodeError, InvalidEvent, LabloopError, SchemaError
from labloop.schemas.topics import TOPICS, TopicSpec, topic

__all__ = [
    "SCHEMA_DIR", "TOPICS", "Codec", "DecodeError", "Decoded", "InvalidEvent", "LabloopError", "SchemaError",
    "TopicSpec", "topic",
]

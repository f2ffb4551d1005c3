"""Avro contracts of labloop: the schemas, the codec, the topic catalogue."""

from schemas.codec import SCHEMA_DIR, Codec, Decoded
from schemas.errors import DecodeError, InvalidEvent, LabloopError, SchemaError
from schemas.topics import TOPICS, TopicSpec, topic

__all__ = [
    "SCHEMA_DIR", "TOPICS", "Codec", "DecodeError", "Decoded", "InvalidEvent", "LabloopError", "SchemaError",
    "TopicSpec", "topic",
]

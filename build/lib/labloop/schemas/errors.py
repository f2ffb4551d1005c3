"""The labloop error hierarchy's root and the contract layer's errors."""

from __future__ import annotations


class LabloopError(Exception):
    """Root of every error labloop raises on purpose."""


class SchemaError(LabloopError):
    """A schema file is missing, malformed, or a record does not fit its schema."""


class DecodeError(LabloopError):
    """Bytes that cannot be turned into a known event."""


class UnknownFraming(DecodeError):
    """Neither Avro single-object encoding (``C3 01``) nor Confluent framing (``00``)."""


class UnknownSchema(DecodeError):
    """The fingerprint or registry id names no schema this codec knows."""


class TruncatedPayload(DecodeError):
    """The framing is right but the Avro body ends early or is corrupt."""


class WrongSchema(DecodeError):
    """A valid event of a type the topic does not carry."""


class InvalidEvent(LabloopError):
    """Schema-valid, but the content is wrong (NaN value, unknown campaign, wrong unit...).

    ``index``: which item of a batch it concerns, when it concerns one.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

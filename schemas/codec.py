"""Avro codec: single-object encoding by default, Confluent framing with a registry.

* Single-object encoding (Avro specification): ``C3 01`` + the 8-byte
  little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing
  Canonical Form + the Avro binary body. Writer schemas resolve against the
  schemas folder (current schemas plus ``history/``), so no service is needed.
* Confluent wire format: ``00`` + 4-byte big-endian schema id + body, the id
  registered and looked up through confluent-kafka's Schema Registry client
  (subject = the record's full name).

:meth:`Codec.decode` reads both. Schemas are parsed once per codec; timestamps
are ``long`` epoch milliseconds in records (logical types are not expanded).
"""

from __future__ import annotations

import copy
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fastavro
from fastavro.schema import to_parsing_canonical_form

from labloop.schemas.errors import SchemaError, TruncatedPayload, UnknownFraming, UnknownSchema, WrongSchema
from labloop.schemas.types import Record

__all__ = ["Codec", "Decoded", "SCHEMA_DIR", "avro_long", "avro_string", "crc64_avro"]

SCHEMA_DIR = Path(__file__).parent / "avro"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
Framing = Literal["single-object", "confluent"]

_EMPTY64 = 0xC15D213AA4D7A795


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc_table()


def crc64_avro(data: bytes) -> int:
    """The Avro specification's 64-bit Rabin fingerprint (CRC-64-AVRO)."""
    fp = _EMPTY64
    for b in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ b) & 0xFF]
    return fp


def avro_long(n: int) -> bytes:
    """Avro's binary encoding of a long: zig-zag, then base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def avro_string(text: str) -> bytes:
    """Avro's binary encoding of a string: its UTF-8 length as a long, then the bytes."""
    b = text.encode()
    return avro_long(len(b)) + b


def _strip_logical(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical(v) for v in node]
    return node


@dataclass(frozen=True)
class _Schema:
    name: str  # full name, e.g. "labloop.AssayReading"
    source: str  # the .avsc JSON text, as written
    parsed: Any  # fastavro-parsed, logical types stripped
    fingerprint: bytes  # 8 bytes, little-endian
    canonical: str = ""  # the Parsing Canonical Form


@dataclass(frozen=True)
class Decoded:
    """A decoded event: ``name`` is the short record name (``"AssayReading"``)."""

    name: str
    record: Record
    framing: Framing


def _load(path: Path) -> _Schema:
    try:
        raw = json.loads(path.read_text())
        parsed = fastavro.parse_schema(_strip_logical(copy.deepcopy(raw)))
        canonical = to_parsing_canonical_form(raw)
    except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"cannot load schema {path}: {exc}") from exc
    name = raw["name"] if "." in raw["name"] else f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".")
    fp = struct.pack("<Q", crc64_avro(canonical.encode()))
    return _Schema(name, path.read_text(), parsed, fp, canonical)


class Codec:
    """Encode and decode labloop events.

    Args:
        schema_dir: folder of ``*.avsc`` (current) and ``history/*.avsc`` (older writers).
        registry_url: Schema Registry URL; when set, :meth:`encode` writes Confluent framing.
        registry_config: extra confluent-kafka ``SchemaRegistryClient`` settings
            (``basic.auth.user.info``, TLS paths...).
        auto_register: register a schema the first time it is written (the registry's default);
            False only looks it up, so that producers never change a governed registry.
        registry: a registry client to use instead of one made from ``registry_url``.

    >>> codec = Codec()
    >>> raw = codec.encode("RequestStatus", {"request_id": "r1", "campaign_id": "c", "compound_id": "x",
    ...     "status": "ACCEPTED", "robot_id": "bot", "reason": None, "event_time": 0})
    >>> raw[:2] == b"\\xc3\\x01", codec.decode(raw).record["status"]
    (True, 'ACCEPTED')
    """

    def __init__(self, schema_dir: Path = SCHEMA_DIR, registry_url: str | None = None,
                 registry_config: dict[str, str] | None = None, auto_register: bool = True,
                 registry: Any = None) -> None:
        self.current: dict[str, _Schema] = {}
        self._by_fp: dict[bytes, _Schema] = {}
        files = sorted(Path(schema_dir).glob("*.avsc"))
        if not files:
            raise SchemaError(f"no *.avsc files in {schema_dir}")
        for path in files:
            s = _load(path)
            self.current[s.name.rsplit(".", 1)[-1]] = s
            self._by_fp[s.fingerprint] = s
        self._history: dict[str, list[tuple[int, _Schema]]] = {}
        for path in sorted((Path(schema_dir) / "history").glob("*.avsc")):
            s = _load(path)
            self._by_fp.setdefault(s.fingerprint, s)
            short, _, version = path.name.removesuffix(".avsc").rpartition(".v")
            if version.isdigit():
                self._history.setdefault(short, []).append((int(version), s))
        self._registry: Any = registry
        self.auto_register = auto_register
        self._ids: dict[str, int] = {}
        self._by_id: dict[int, _Schema] = {}
        if registry_url and registry is None:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            # new_client: an http(s):// registry, or confluent-kafka's in-process mock for mock://
            self._registry = SchemaRegistryClient.new_client({"url": registry_url, **(registry_config or {})})

    @property
    def names(self) -> list[str]:
        """Short names of the current schemas."""
        return sorted(self.current)

    def schema(self, name: str) -> _Schema:
        try:
            return self.current[name]
        except KeyError:
            raise SchemaError(f"no schema named {name!r}; known: {', '.join(self.names)}") from None

    def fingerprint(self, name: str) -> bytes:
        """8-byte CRC-64-AVRO fingerprint of the current schema ``name``."""
        return self.schema(name).fingerprint

    def versions(self, name: str) -> list[str]:
        """Every version of schema ``name`` in the order written: ``history/NAME.vN.avsc`` by N,
        then the current one if it is newer. Each is Avro source text."""
        out = [s.source for _, s in sorted(self._history.get(name, []), key=lambda v: v[0])]
        cur = self.schema(name)
        if not any(s.fingerprint == cur.fingerprint for _, s in self._history.get(name, [])):
            out.append(cur.source)
        return out

    def govern(self, level: str = "BACKWARD_TRANSITIVE") -> dict[str, int]:
        """Register every version of every schema, in history order, under its record name (the
        subject: a topic may carry several record types), and set each subject's compatibility to
        ``level``; returns subject -> the number of versions it holds.

        Raises:
            SchemaError: no registry is configured, or it refused a version (the message names it).
        """
        from confluent_kafka.schema_registry import Schema

        if self._registry is None:
            raise SchemaError("no schema registry configured (LABLOOP_SCHEMA_REGISTRY_URL)")
        out: dict[str, int] = {}
        for name in self.names:
            subject = self.schema(name).name
            for i, source in enumerate(self.versions(name), 1):
                try:
                    self._registry.register_schema(subject, Schema(source, "AVRO"))
                except Exception as exc:  # the registry client raises its own error types
                    raise SchemaError(f"the registry refused version {i} of {subject}: {exc}") from exc
            try:
                self._registry.set_compatibility(subject_name=subject, level=level)
            except Exception as exc:
                raise SchemaError(f"the registry refused {level} for {subject}: {exc}") from exc
            out[subject] = len(self._registry.get_versions(subject))
        return out

    def _registry_id(self, s: _Schema) -> int:
        if s.name not in self._ids:
            from confluent_kafka.schema_registry import Schema

            if self.auto_register:
                sid = int(self._registry.register_schema(s.name, Schema(s.source, "AVRO")))
            else:
                try:
                    sid = int(self._registry.lookup_schema(s.name, Schema(s.source, "AVRO")).schema_id)
                except Exception as exc:
                    raise SchemaError(f"{s.name} is not registered and auto-registration is off: run "
                                      f"`labloop topics` with the operator's registry credentials ({exc})") from exc
            self._ids[s.name] = sid
            self._by_id[sid] = s
        return self._ids[s.name]

    def encode(self, name: str, record: Record) -> bytes:
        """Serialize ``record`` as the current schema ``name``.

        Raises:
            SchemaError: unknown name, or the record does not fit the schema.
        """
        s = self.schema(name)
        buf = io.BytesIO()
        if self._registry is not None:
            buf.write(CONFLUENT_MAGIC + struct.pack(">I", self._registry_id(s)))
        else:
            buf.write(SINGLE_OBJECT_MAGIC + s.fingerprint)
        try:
            fastavro.schemaless_writer(buf, s.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SchemaError(f"{name} record does not fit its schema: {exc}") from exc
        return buf.getvalue()

    def encode_with_items(self, name: str, record: Record, items: bytes, n_items: int) -> bytes:
        """Serialize ``record`` whose *last* field is an array given already Avro-encoded: ``items``
        holds the binary encoding of ``n_items`` array elements, back to back (a fast path for
        large arrays built with NumPy; the result reads exactly like :meth:`encode`'s).

        Raises:
            SchemaError: as :meth:`encode`, or the last field is not an array.
        """
        fields = self.schema(name).parsed.get("fields", [])
        last = fields[-1] if fields else {}
        if not (isinstance(last.get("type"), dict) and last["type"].get("type") == "array"):
            raise SchemaError(f"{name}: the last field is not an array")
        head = self.encode(name, {**record, last["name"]: []})  # ends with the empty array's terminator 0
        return head[:-1] + avro_long(n_items) + items + b"\x00" if n_items else head

    def _writer_for(self, data: bytes) -> tuple[_Schema, int, Framing]:
        if not data:
            raise UnknownFraming("empty message")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise TruncatedPayload(f"single-object header needs 10 bytes, got {len(data)}")
            s = self._by_fp.get(data[2:10])
            if s is None:
                raise UnknownSchema(f"no schema with fingerprint {data[2:10].hex()}")
            return s, 10, "single-object"
        if data[:1] == CONFLUENT_MAGIC:
            if len(data) < 5:
                raise TruncatedPayload(f"Confluent header needs 5 bytes, got {len(data)}")
            sid = struct.unpack(">I", data[1:5])[0]
            return self._schema_by_id(sid), 5, "confluent"
        raise UnknownFraming(f"unknown framing, first bytes {data[:2].hex() or '(empty)'}")

    def _schema_by_id(self, sid: int) -> _Schema:
        if sid in self._by_id:
            return self._by_id[sid]
        if self._registry is None:
            raise UnknownSchema(f"Confluent schema id {sid} but no schema registry is configured")
        try:
            text = self._registry.get_schema(sid).schema_str
        except Exception as exc:  # the registry client raises its own error types
            raise UnknownSchema(f"schema id {sid} not found in the registry: {exc}") from exc
        raw = json.loads(text)
        short = raw["name"].rsplit(".", 1)[-1]
        if short not in self.current:
            raise UnknownSchema(f"schema id {sid} is {raw['name']!r}, not a labloop event")
        s = _Schema(self.current[short].name, text, fastavro.parse_schema(_strip_logical(raw)), b"",
                    to_parsing_canonical_form(raw))
        self._by_id[sid] = s
        return s

    def writer(self, data: bytes) -> tuple[str, str, int]:
        """Who wrote one message value: the short record name, the Parsing Canonical Form of
        the writer schema, and where the Avro body starts (what a specialised reader checks).

        Raises:
            UnknownFraming, UnknownSchema, TruncatedPayload (all :class:`DecodeError`).
        """
        writer, start, _ = self._writer_for(data)
        return writer.name.rsplit(".", 1)[-1], writer.canonical, start

    def decode(self, data: bytes, expect: tuple[str, ...] | None = None) -> Decoded:
        """Decode one message value, either framing.

        Args:
            expect: short names the caller accepts; anything else raises :class:`WrongSchema`.

        Raises:
            UnknownFraming, UnknownSchema, TruncatedPayload, WrongSchema (all :class:`DecodeError`).
        """
        writer, start, framing = self._writer_for(data)
        short = writer.name.rsplit(".", 1)[-1]
        if expect is not None and short not in expect:
            raise WrongSchema(f"got {short}, expected {' or '.join(expect)}")
        reader = self.current.get(short, writer)
        buf = io.BytesIO(data)
        buf.seek(start)
        try:
            record = fastavro.schemaless_reader(buf, writer.parsed, reader.parsed if reader is not writer else None)
        except (EOFError, StopIteration, ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
            raise TruncatedPayload(f"{short} body is truncated or corrupt: {exc.__class__.__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise TruncatedPayload(f"{short} body has {len(data) - buf.tell()} trailing bytes")
        return Decoded(short, record, framing)  # type: ignore[arg-type]

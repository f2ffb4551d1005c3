"""Instruments and the LIMS: publish compounds and readings from CSV files.

Rows are checked for structure only (columns present, numbers numeric, ids not
empty); a malformed row is reported with its line number and reason and the
good rows around it are still published. Chemistry (does the SMILES parse?) is
the worker's job: an unparseable SMILES ends on the dead-letter topic.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Producer

from labloop.consumers.errors import BadRow
from labloop.consumers.virtual_lab import open_text
from labloop.schemas import TOPICS, Codec
from labloop.schemas.types import Record

__all__ = ["PublishResult", "compound_id_of", "compound_rows", "publish_records", "reading_rows"]

_QUALIFIERS = {"=": "EQ", "": "EQ", "<": "LT", ">": "GT", "EQ": "EQ", "LT": "LT", "GT": "GT"}


@dataclass
class PublishResult:
    """What a publish run did: ``published`` events, and one :class:`BadRow` per rejected row."""

    published: int = 0
    errors: list[BadRow] = field(default_factory=list)


def _rows(path: Path, required: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise BadRow(1, f"missing column(s) {missing}; the file has {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(text: str, n: int) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:n]


def compound_id_of(smiles: str) -> str:
    """The compound id given to a SMILES registered without one: ``C`` + 16 hex digits of its SHA-1.

    >>> compound_id_of("CCO")
    'C89b394fd02e5e5e6'
    """
    return "C" + _digest(smiles, 16)


def compound_rows(path: Path, campaign_id: str, smiles_col: str = "smiles", id_col: str | None = None,
                  source: str = "lims") -> Iterator[Record | BadRow]:
    """``CompoundRegistered`` records from a CSV; without ``id_col`` the id is a hash of the SMILES."""
    required = [smiles_col] + ([id_col] if id_col else [])
    t = _now_ms()
    for line, row in _rows(path, required):
        smiles = row[smiles_col]
        if not smiles:
            yield BadRow(line, f"empty {smiles_col!r}")
            continue
        cid = row[id_col] if id_col else compound_id_of(smiles)
        if not cid:
            yield BadRow(line, f"empty {id_col!r}")
            continue
        yield {"campaign_id": campaign_id, "compound_id": cid, "smiles": smiles, "source": source,
               "event_time": t, "ingest_time": t}


def reading_rows(path: Path, campaign_id: str, assay_id: str, unit: str, compound_col: str = "compound_id",
                 value_col: str = "value", qualifier_col: str | None = None, id_col: str | None = None,
                 instrument_id: str = "lims-import", smiles_col: str | None = None) -> Iterator[Record | BadRow]:
    """``AssayReading`` records from a CSV.

    A value may carry its qualifier (``<5.2``); without ``id_col`` the reading id
    is a hash of campaign, compound, assay, value and line, so re-publishing
    the same file is idempotent. With ``smiles_col`` instead of ``compound_col``
    the compound id is derived from the SMILES as in :func:`compound_rows`.
    """
    key_col = smiles_col or compound_col
    required = [key_col, value_col] + [c for c in (qualifier_col, id_col) if c]
    t = _now_ms()
    for line, row in _rows(path, required):
        key = row[key_col]
        if not key:
            yield BadRow(line, f"empty {key_col!r}")
            continue
        cid = compound_id_of(key) if smiles_col else key
        raw = row[value_col]
        qual = row[qualifier_col] if qualifier_col else ""
        if raw[:1] in "<>=" and raw:
            qual, raw = raw[0], raw[1:].strip()
        if qual not in _QUALIFIERS:
            yield BadRow(line, f"qualifier {qual!r} is not one of = < >")
            continue
        try:
            value = float(raw)
        except ValueError:
            yield BadRow(line, f"value {row[value_col]!r} is not a number")
            continue
        if not math.isfinite(value):
            yield BadRow(line, f"value {row[value_col]!r} is not finite")
            continue
        rid = row[id_col] if id_col else _digest(f"{campaign_id}|{cid}|{assay_id}|{raw}|{line}", 20)
        yield {"reading_id": rid, "campaign_id": campaign_id, "compound_id": cid, "assay_id": assay_id, "value": value,
               "unit": unit, "qualifier": _QUALIFIERS[qual], "request_id": None, "instrument_id": instrument_id,
               "event_time": t, "ingest_time": t}


def publish_records(producer: Producer, codec: Codec, role: str, name: str, rows: Iterator[Record | BadRow],
                    on_progress: Callable[[int], None] | None = None) -> PublishResult:
    """Publish every good row to the topic of ``role``, keyed by ``campaign_id``; collect the bad ones."""
    topic = TOPICS[role]
    res = PublishResult()
    for item in rows:
        if isinstance(item, BadRow):
            res.errors.append(item)
            continue
        producer.produce(topic.name, key=str(item[topic.key]).encode(), value=codec.encode(name, item))
        res.published += 1
        if res.published % 5000 == 0:
            producer.poll(0)
            if on_progress:
                on_progress(res.published)
    left = producer.flush(30)
    if left:
        raise TimeoutError(f"{left} of {res.published} events were not acknowledged by the broker")
    if on_progress:
        on_progress(res.published)
    return res

"""The sink's compiled plate reader: the same rows as fastavro, and None for whatever the codec refuses."""

from __future__ import annotations

import random
from typing import Any

import pyarrow as pa
import pytest

from labloop.consumers.columns import Batch, Seen
from labloop.consumers.plates import PLATE_CANONICAL, decode_plate
from labloop.consumers.tables import TABLES
from labloop.schemas import Codec, DecodeError
from labloop.schemas.codec import avro_long

TOPIC = "labloop.plates"


def _text(rng: random.Random) -> str:
    return "".join(rng.choice("aZ09-_ éü中😀") for _ in range(rng.randint(0, 9)))


def _plate(rng: random.Random, i: int, n: int) -> dict[str, Any]:
    return {"plate_id": _text(rng), "campaign_id": _text(rng), "assay_id": _text(rng), "unit": _text(rng),
            "instrument_id": _text(rng), "event_time": rng.randint(-2**40, 2**41), "ingest_time": rng.randint(0, 2**41),
            "wells": [{"reading_id": f"{i}-{w}-{_text(rng)}", "compound_id": _text(rng), "well": _text(rng),
                       "value": rng.choice([rng.gauss(0, 1e6), float("inf"), -0.0, 5e-324]),
                       "qualifier": rng.choice(["EQ", "LT", "GT"]), "request_id": rng.choice([None, _text(rng)])}
                      for w in range(n)]}


def _rows(t: pa.Table) -> dict[str, list[Any]]:
    """Columns as lists, NaN as a string (NaN != NaN, but a corrupt double may well be one)."""
    return {c: ["NaN" if isinstance(v, float) and v != v else v for v in t.column(c).to_pylist()] for c in t.column_names}


def _both(codec: Codec, messages: list[bytes], seen: bool = False) -> tuple[pa.Table, pa.Table]:
    """The readings batch of ``messages`` built from the codec's records and from the compiled reader."""
    a, b = Batch(TABLES["readings"], "k"), Batch(TABLES["readings"], "k")
    sa, sb = (Seen(100), Seen(100)) if seen else (None, None)
    for off, m in enumerate(messages):
        _, _, start = codec.writer(m)
        wells = decode_plate(m, start)
        assert wells is not None
        a.add(codec.decode(m).record, TOPIC, 3, off, 7, sa)
        b.add_plate(m, wells, TOPIC, 3, off, 7, sb)
    assert a.token() == b.token() and a.size == b.size
    return a.arrow(), b.arrow()


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def test_the_reader_is_for_the_current_plate_schema(codec: Codec) -> None:
    """A new PlateReadout version must come with a new reader (the sink falls back to fastavro until then)."""
    name, canonical, _ = codec.writer(codec.encode("PlateReadout", _plate(random.Random(0), 0, 1)))
    assert (name, canonical) == ("PlateReadout", PLATE_CANONICAL)


def test_the_same_rows_as_the_codecs_records(codec: Codec) -> None:
    rng = random.Random(1)
    messages = [codec.encode("PlateReadout", _plate(rng, i, rng.choice([0, 1, 5, 384]))) for i in range(24)]
    ours, theirs = _both(codec, messages)
    assert ours.schema == theirs.schema and ours.num_rows == theirs.num_rows > 1000
    assert _rows(ours) == _rows(theirs)
    assert None in theirs.column("request_id").to_pylist()


def test_a_reading_sent_twice_is_dropped_by_either_path(codec: Codec) -> None:
    well = {"reading_id": "w1", "compound_id": "x", "well": "A01", "value": 1.0, "qualifier": "EQ", "request_id": None}
    plate = {"plate_id": "p", "campaign_id": "c", "assay_id": "a", "unit": "u", "instrument_id": "i", "event_time": 0,
             "ingest_time": 0, "wells": [well, {**well, "reading_id": "w2"}, well]}
    ours, theirs = _both(codec, [codec.encode("PlateReadout", plate)] * 2, seen=True)
    assert ours.column("reading_id").to_pylist() == theirs.column("reading_id").to_pylist() == ["w1", "w2"]


def test_longs_at_their_limits(codec: Codec) -> None:
    for t in (-2**63, 2**63 - 1, -1, 0):
        m = codec.encode("PlateReadout", {**_plate(random.Random(4), 0, 1), "event_time": t, "ingest_time": -t - 1})
        wells = decode_plate(m, 10)
        assert wells is not None and (int(wells.header[10]), int(wells.header[11])) == (t, -t - 1)
        assert codec.decode(m).record["event_time"] == t


def test_blocks_with_negative_counts_are_read(codec: Codec) -> None:
    """Avro lets a writer give a block's count negated, followed by its size in bytes (fastavro never does)."""
    rng = random.Random(2)
    raw = codec.encode("PlateReadout", _plate(rng, 0, 0))  # wells: one 0 byte, the end of the array
    well = codec.encode("PlateReadout", {**_plate(rng, 0, 1), "plate_id": "", "campaign_id": "", "assay_id": "",
                                         "unit": "", "instrument_id": "", "event_time": 0, "ingest_time": 0})
    body = well[10 + 7 + 1:-1]  # the one well's bytes: after 5 empty strings, 2 zero longs and the count 1
    message = raw[:-1] + avro_long(-1) + avro_long(len(body)) + body + b"\x00"
    ours, theirs = _both(codec, [message])
    assert _rows(ours) == _rows(theirs) and ours.num_rows == 1


def _mutants(rng: random.Random, messages: list[bytes], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        m = bytearray(rng.choice(messages))
        if rng.random() < 0.3:
            del m[rng.randint(10, len(m) - 1):]
        else:
            for _ in range(rng.randint(1, 3)):
                m[rng.randint(10, len(m) - 1)] = rng.randint(0, 255)
        out.append(bytes(m))
    return out


def _crafted(codec: Codec) -> list[bytes]:
    """One known well, broken on purpose: an enum index past the symbols, a union index past its
    branches, a trailing byte, invalid UTF-8, a negative string length, a count far past the body."""
    well = {"reading_id": "r", "compound_id": "c", "well": "w", "value": 1.0, "qualifier": "GT", "request_id": None}
    m = codec.encode("PlateReadout", {"plate_id": "", "campaign_id": "", "assay_id": "", "unit": "", "instrument_id": "",
                                      "event_time": 0, "ingest_time": 0, "wells": [well]})
    # header 10 bytes | 5 empty strings | 2 zero longs | count 1 | "r" "c" "w" | double | enum 2 | null | end
    assert m[17] == 2 and m[18:24] == b"\x02r\x02c\x02w" and m[32:] == b"\x04\x00\x00"
    return [m[:32] + b"\x06" + m[33:], m[:33] + b"\x04" + m[34:], m + b"\x00", m[:19] + b"\xff" + m[20:],
            m[:10] + b"\x01" + m[11:], m[:17] + avro_long(10**6) + m[18:]]


def test_whatever_the_codec_refuses_the_reader_refuses(codec: Codec) -> None:
    """Corrupt plates: when the codec raises, the reader returns None (and the sink names the codec's
    error); when the reader accepts one, the codec does too, with the same rows. It never reads past
    the message."""
    rng = random.Random(3)
    messages = [codec.encode("PlateReadout", _plate(rng, i, rng.choice([1, 4, 20]))) for i in range(8)]
    refused = accepted = 0
    crafted = _crafted(codec)
    for m in crafted:
        with pytest.raises(DecodeError):
            codec.decode(m)
        assert decode_plate(m, 10) is None
    for m in _mutants(rng, messages, 1500):
        wells = decode_plate(m, 10)
        try:
            record = codec.decode(m).record
        except DecodeError:
            assert wells is None, m.hex()
            refused += 1
            continue
        if wells is not None:
            a, b = Batch(TABLES["readings"], "k"), Batch(TABLES["readings"], "k")
            a.add(record, TOPIC, 0, 0)
            b.add_plate(m, wells, TOPIC, 0, 0)
            assert _rows(a.arrow()) == _rows(b.arrow())
            accepted += 1
    assert refused > 300 and accepted > 100

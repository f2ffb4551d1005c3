"""Plates straight into columns: a compiled decoder for the current ``PlateReadout``.

A plate of 384 wells decoded by fastavro is 384 dicts of six values, about 1.8 us a well on
this project's 2-core machine and half of the sink's time (py-spy). :func:`decode_plate` walks
the Avro body once in compiled code (numba) and records where each well's fields lie; the
sink's batch turns those positions into Arrow arrays for the whole insert at once.

It is an accelerator, not a second reader: it accepts only what fastavro accepts, with the same
values, and returns None for anything else (an older writer schema, a truncated or corrupt body,
invalid UTF-8, an enum or union index out of range), after which the caller decodes with
:class:`~labloop.schemas.Codec` and gets its named error. Every read is bounds-checked: the
body is untrusted bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa

__all__ = ["PLATE_CANONICAL", "PlatePositions", "decode_plate", "strings", "warm_up"]

#: The writer schema this decoder reads, as its Parsing Canonical Form (a test checks it against
#: ``schemas/avro/PlateReadout.avsc``: a new PlateReadout version must update the decoder).
PLATE_CANONICAL = (
    '{"name":"labloop.PlateReadout","type":"record","fields":[{"name":"plate_id","type":"string"},'
    '{"name":"campaign_id","type":"string"},{"name":"assay_id","type":"string"},{"name":"unit","type":"string"},'
    '{"name":"instrument_id","type":"string"},{"name":"event_time","type":"long"},'
    '{"name":"ingest_time","type":"long"},{"name":"wells","type":{"type":"array","items":'
    '{"name":"labloop.WellReading","type":"record","fields":[{"name":"reading_id","type":"string"},'
    '{"name":"compound_id","type":"string"},{"name":"well","type":"string"},{"name":"value","type":"double"},'
    '{"name":"qualifier","type":{"name":"labloop.Qualifier","type":"enum","symbols":["EQ","LT","GT"]}},'
    '{"name":"request_id","type":["null","string"]}]}}}]}')

_N_HEADER_STRINGS = 5  # plate_id, campaign_id, assay_id, unit, instrument_id
_N_WELL_STRINGS = 4  # reading_id, compound_id, well, request_id (length -1: null)
_MIN_WELL_BYTES = 13  # three empty strings, a double, an enum, a union index


@numba.njit(cache=True, nogil=True)
def _long(buf: np.ndarray, pos: int, end: int) -> tuple[int, int]:
    """A zig-zag varint at ``pos``: (value, next position); next position -1 if malformed."""
    acc = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            return 0, -1
        b = int(buf[pos])
        pos += 1
        if shift == 63 and b > 1:  # the tenth byte may hold only the 64th bit
            return 0, -1
        acc |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    return ((acc >> 1) & 0x7FFFFFFFFFFFFFFF) ^ -(acc & 1), pos  # a logical shift: acc may have bit 63 set


@numba.njit(cache=True, nogil=True)
def _utf8_ok(buf: np.ndarray, start: int, stop: int) -> bool:
    """Whether ``buf[start:stop]`` is UTF-8 as Python's strict decoder accepts it (no overlong
    forms, no surrogates, nothing above U+10FFFF)."""
    i = start
    while i < stop:
        c = buf[i]
        if c < 0x80:
            i += 1
            continue
        # n continuation bytes follow; the first must lie in [lo, hi], which rules out overlong
        # forms (E0, F0), surrogates (ED) and code points past U+10FFFF (F4), as Python does.
        if 0xC2 <= c <= 0xDF:
            n, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            n, lo, hi = 2, 0xA0, 0xBF
        elif c == 0xED:
            n, lo, hi = 2, 0x80, 0x9F
        elif 0xE1 <= c <= 0xEF:
            n, lo, hi = 2, 0x80, 0xBF
        elif c == 0xF0:
            n, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            n, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            n, lo, hi = 3, 0x80, 0x8F
        else:
            return False
        if i + n >= stop:  # the sequence runs past the string
            return False
        b = buf[i + 1]
        if b < lo or b > hi:
            return False
        for k in range(2, n + 1):
            b = buf[i + k]
            if b < 0x80 or b > 0xBF:
                return False
        i += n + 1
    return True


@numba.njit(cache=True, nogil=True)
def _string(buf: np.ndarray, pos: int, end: int) -> tuple[int, int, int]:
    """An Avro string at ``pos``: (start, length, next position); next position -1 if malformed."""
    n, pos = _long(buf, pos, end)
    if pos < 0 or n < 0 or n > end - pos or not _utf8_ok(buf, pos, pos + n):
        return 0, 0, -1
    return pos, n, pos + n


@numba.njit(cache=True, nogil=True)
def _decode(buf: np.ndarray, start: int, header: np.ndarray, strs: np.ndarray, values: np.ndarray,
            qualifiers: np.ndarray) -> int:
    """Fill the outputs from the body ``buf[start:]``; returns the number of wells, or -1."""
    end = buf.shape[0]
    pos = start
    for k in range(_N_HEADER_STRINGS):
        s, n, pos = _string(buf, pos, end)
        if pos < 0:
            return -1
        header[2 * k] = s
        header[2 * k + 1] = n
    for k in range(2):  # event_time, ingest_time
        v, pos = _long(buf, pos, end)
        if pos < 0:
            return -1
        header[2 * _N_HEADER_STRINGS + k] = v
    cap = qualifiers.shape[0]
    vbytes = values.view(np.uint8)
    w = 0
    while True:
        count, pos = _long(buf, pos, end)
        if pos < 0:
            return -1
        if count == 0:
            break
        if count < 0:  # a block with its byte size after the count (fastavro writes positive counts; others may not)
            count = -count
            _, pos = _long(buf, pos, end)
            if pos < 0:
                return -1
        if count > cap - w:
            return -1
        for _ in range(count):
            for k in range(3):
                s, n, pos = _string(buf, pos, end)
                if pos < 0:
                    return -1
                strs[w, 2 * k] = s
                strs[w, 2 * k + 1] = n
            if pos + 8 > end:
                return -1
            for b in range(8):
                vbytes[8 * w + b] = buf[pos + b]
            pos += 8
            q, pos = _long(buf, pos, end)
            if pos < 0 or q < 0 or q > 2:
                return -1
            qualifiers[w] = q
            u, pos = _long(buf, pos, end)
            if pos < 0 or u < 0 or u > 1:
                return -1
            if u == 0:
                strs[w, 6] = 0
                strs[w, 7] = -1
            else:
                s, n, pos = _string(buf, pos, end)
                if pos < 0:
                    return -1
                strs[w, 6] = s
                strs[w, 7] = n
            w += 1
    if pos != end:  # trailing bytes: the codec refuses them too
        return -1
    return w


@dataclass(frozen=True)
class PlatePositions:
    """Where one plate's fields lie in its message.

    Attributes:
        header: int64[12]: (start, length) of plate_id, campaign_id, assay_id, unit and
            instrument_id in the message, then event_time and ingest_time (epoch ms).
        strs: int64[n, 8]: per well, (start, length) of reading_id, compound_id, well and
            request_id (length -1: null).
        values: float64[n]; qualifiers: int8[n], indexes into ``("EQ", "LT", "GT")``.
    """

    header: np.ndarray
    strs: np.ndarray
    values: np.ndarray
    qualifiers: np.ndarray

    @property
    def n(self) -> int:
        return int(self.values.shape[0])


def decode_plate(message: bytes, start: int) -> PlatePositions | None:
    """The wells of a current-schema ``PlateReadout`` whose Avro body starts at ``start``;
    None when the body is anything but a well-formed one (decode it with the codec then)."""
    buf = np.frombuffer(message, dtype=np.uint8)
    cap = max(0, (len(message) - start) // _MIN_WELL_BYTES)
    header = np.empty(12, dtype=np.int64)
    strs = np.empty((cap, 2 * _N_WELL_STRINGS), dtype=np.int64)
    values = np.empty(cap, dtype=np.float64)
    qualifiers = np.empty(cap, dtype=np.int8)
    n = _decode(buf, start, header, strs, values, qualifiers)
    if n < 0:
        return None
    return PlatePositions(header, strs[:n], values[:n], qualifiers[:n])


@numba.njit(cache=True, nogil=True)
def _gather(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, data: np.ndarray) -> None:
    o = 0
    for i in range(starts.shape[0]):
        offsets[i] = o
        n = lengths[i]
        if n > 0:
            s = starts[i]
            data[o:o + n] = buf[s:s + n]
            o += n
    offsets[starts.shape[0]] = o


def strings(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """An Arrow string array of the byte ranges ``buf[starts[i]:starts[i] + lengths[i]]``
    (uint8 buffer, int64 positions); a negative length is a null."""
    n = starts.shape[0]
    valid = lengths >= 0
    lens = np.where(valid, lengths, 0)
    total = int(lens.sum())
    offsets = np.empty(n + 1, dtype=np.int64 if total >= 2**31 else np.int32)
    data = np.empty(total, dtype=np.uint8)
    _gather(buf, starts, lens, offsets, data)
    typ = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    nulls = int(n - valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    arr = pa.Array.from_buffers(typ, n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(data)], null_count=nulls)
    return arr.cast(pa.string()) if typ == pa.large_string() else arr


def warm_up() -> None:
    """Load (or, the first time on a machine, compile: a few seconds) the compiled code now, so
    that the first plate does not wait for it. numba caches it beside this module."""
    one_well = bytes(5 + 2) + b"\x02" + bytes(3) + bytes(8) + b"\x00\x00" + b"\x00"  # an empty plate of one well
    wells = decode_plate(one_well, 0)
    assert wells is not None and wells.n == 1
    strings(np.frombuffer(one_well, dtype=np.uint8), wells.strs[:, 6], wells.strs[:, 7])  # a null: every branch

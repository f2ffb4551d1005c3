"""Compaction of the durable broker's log: many small record batches merged into few.

Tansu's ``s3://`` engine keeps each produced record batch as one object and lists a partition's
objects on every fetch, within the fetch's ``max.wait``; a listing that outlasts the wait returns
nothing. A partition that gathers thousands of small batches (a robot's readings, a status per
request) would, after days, starve every consumer that long-polls briefly (measured with a
Python S3 server listing about 24 µs per object: at a 10 ms long poll, a partition of 2,000
batches served nothing).

The object store rewrites runs of old, small, adjacent batches of a partition (:func:`plan_runs`)
as one batch (:func:`merge_batches`: Kafka record-batch v2, lz4), named by the first batch's base
offset, and then removes the others. Every record keeps its offset, timestamp, key, value and headers. A consumer positioned
inside a merged range still reads from its offset: this Tansu returns the batch that contains the
fetch offset, and clients skip the records before it. Only batches older than ``min_age_s`` and
never a partition's ``keep_newest`` newest are touched, so consumers near the head are not in the
way; a fetch that listed a removed object a moment before fails once and is retried by its client.
Transactional, control and idempotent-producer batches are left as they are.

The object store (``streams/objectstore.py``) runs the compaction; this module is the pure part:
which batches to merge, and how.
"""

from __future__ import annotations

import time

__all__ = ["merge_batches", "mergeable", "plan_runs"]

TARGET_BYTES = 512 * 1024  # a merged batch's size limit: under the clients' 1 MiB default fetch per partition
MIN_AGE_S = 1.0  # only batches older than this, and never a partition's KEEP_NEWEST newest
KEEP_NEWEST = 8  # a consumer within this many batches of the head reads objects compaction leaves alone
MIN_OBJECTS = 64  # partitions with fewer objects are left alone (their listing is already short)
_LZ4 = 3
_TRANSACTIONAL, _CONTROL, _LOG_APPEND_TIME = 0x10, 0x20, 0x08


def mergeable(data: bytes) -> bool:
    """A plain v2 batch (not transactional, control, log-append-time or idempotent)."""
    from aiokafka.record.default_records import DefaultRecordBatch

    if len(data) < 61 or data[16] != 2:  # magic byte at offset 16; only v2 batches
        return False
    batch = DefaultRecordBatch(data)
    attrs = int.from_bytes(data[21:23], "big", signed=True)
    return not (attrs & (_TRANSACTIONAL | _CONTROL | _LOG_APPEND_TIME)) and batch.producer_id == -1


def merge_batches(parts: list[tuple[int, bytes]]) -> bytes:
    """One v2 record batch (base offset 0 in its header, as Tansu stores it) from ``parts``.

    Args:
        parts: ``(base_offset, batch_bytes)`` in offset order; each batch's header base offset is
            ignored (Tansu names the object by it), record offsets are ``base_offset + delta``.
    Returns:
        the merged batch: record offsets relative to ``parts[0]``'s base offset, lz4-compressed.
    """
    from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

    base = parts[0][0]
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=_LZ4, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=2**31 - 1)
    last = -1
    for start, data in parts:
        batch = DefaultRecordBatch(bytes(data))
        header_base = int.from_bytes(data[0:8], "big", signed=True)
        for rec in batch:
            delta = start + (rec.offset - header_base) - base
            if delta <= last:
                raise ValueError(f"offsets out of order at {base + delta}")
            builder.append(delta, rec.timestamp, rec.key, rec.value, list(rec.headers))
            last = delta
    out = bytearray(builder.build())
    out[0:8] = (0).to_bytes(8, "big")
    return bytes(out)


def plan_runs(entries: list[tuple[str, int, float]], now: float | None = None, min_age_s: float = MIN_AGE_S,
              target_bytes: int = TARGET_BYTES, keep_newest: int = KEEP_NEWEST) -> list[list[str]]:
    """Which batches of one partition to merge: runs of at least two adjacent small ones.

    Args:
        entries: ``(key, size_bytes, mtime_s)`` of the partition's batch objects, any order; a
            key ends in the batch's 20-digit base offset and ``.batch``.
    Returns:
        runs of keys in offset order, each under ``target_bytes`` in all. Batches younger than
        ``min_age_s``, the ``keep_newest`` newest, and batches of at least half the target end runs.
    """
    now = time.time() if now is None else now
    ordered = sorted(entries)
    if keep_newest:
        ordered = ordered[:-keep_newest]
    runs: list[list[str]] = []
    run: list[str] = []
    size = 0
    for key, n, mtime in ordered:
        if now - mtime < min_age_s:
            break
        if n >= target_bytes // 2 or size + n > target_bytes:
            if len(run) >= 2:
                runs.append(run)
            run, size = [], 0
            if n >= target_bytes // 2:
                continue
        run.append(key)
        size += n
    if len(run) >= 2:
        runs.append(run)
    return runs

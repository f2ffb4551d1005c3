"""Rebuild a worker's campaign state before it starts consuming.

A worker keeps campaigns in memory and checkpoints them (:mod:`labloop.streams.checkpoint`).
Its replacement (after a crash or a restart) loads the checkpoint, then reads each
input partition from the checkpoint's floor (from the start where there is no
checkpoint) up to the offsets its consumer group committed (definitions and compounds
to their end: the requests were drawn from them), plus everything it ever
published on the requests and model-updates topics, and applies them without
emitting anything. Faust then resumes at the committed offsets. Every handler is
idempotent (compounds by id, readings by ``reading_id``, statuses by request state),
so a message both in the checkpoint and replayed counts once; issued requests stay
pending until they are answered, and model versions continue where they stopped.
The learner restored from a checkpoint keeps its fit: only readings after the
checkpoint are new to it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from labloop.models import FeatureSpec, ModelError, parse_many
from labloop.models.chem import MoleculeLimits, featurize_mols
from labloop.schemas import TOPICS, Codec, LabloopError
from labloop.streams.checkpoint import CheckpointStore
from labloop.streams.engine import CampaignEngine

__all__ = ["RecoveryError", "rebuild"]

log = logging.getLogger("labloop.recovery")


class RecoveryError(LabloopError):
    """The input topics could not be replayed up to the committed offsets."""
_INPUTS = ("campaigns", "compounds", "readings", "plates", "status", "decisions")
# What the issued requests are built on: read to the end, past the committed offsets (see rebuild).
_TO_END = ("campaigns", "compounds")
_OWN = ("proposals", "requests", "model_updates")


def _read(c: Consumer, tps: list[TopicPartition], stops: dict[tuple[str, int], int] | None = None,
          idle_s: float = 1.0, stall_s: float = 20.0) -> list[Any]:
    """Messages of ``tps`` from their offsets: up to ``stops`` (exclusive) where given, else to
    each partition's high watermark and then until nothing arrives for ``idle_s`` (Tansu's high
    watermarks can undercount; idleness alone ended a replay early when a restarted broker took
    over a second to answer the first fetch, and the worker then issued requests again). A
    partition that stops short of its stop offset for ``stall_s`` is reported, never silently cut."""
    if not tps:
        return []
    c.assign(tps)
    out: list[Any] = []
    want = {(tp.topic, tp.partition): stops[(tp.topic, tp.partition)] for tp in tps} if stops else {}
    # Without stops: at least to the high watermark (a floor, given the undercount), then the idle tail.
    floor = {} if stops else {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=30)[1] for tp in tps}
    pos: dict[tuple[str, int], int] = {(tp.topic, tp.partition): tp.offset for tp in tps}
    idle = time.monotonic()
    while True:
        msgs = c.consume(10_000, 0.2)
        if msgs:
            idle = time.monotonic()
        for m in msgs:
            if m.error():
                continue
            out.append(m)
            tp = (str(m.topic()), int(m.partition() or 0))
            pos[tp] = max(pos[tp], int(m.offset() or 0) + 1)
        if want:
            if all(pos[tp] >= stop for tp, stop in want.items()):
                break
            if time.monotonic() - idle > stall_s:
                short = {f"{t}[{p}]": (pos[(t, p)], stop) for (t, p), stop in want.items() if pos[(t, p)] < stop}
                raise RecoveryError(f"replay stalled short of the committed offsets (at, want): {short}")
        elif time.monotonic() - idle > idle_s:
            short = {f"{t}[{p}]": (pos[(t, p)], hw) for (t, p), hw in floor.items() if pos[(t, p)] < hw}
            if not short:
                break
            if time.monotonic() - idle > stall_s:
                raise RecoveryError(f"replay stalled short of the high watermarks (at, want): {short}")
    c.unassign()
    return out


def rebuild(engine: CampaignEngine, kafka_config: dict[str, str], group_id: str, codec: Codec, spec: FeatureSpec,
            store: CheckpointStore | None = None, limits: MoleculeLimits | None = None,
            max_plate_wells: int = 1536) -> dict[str, int]:
    """Fill ``engine`` from the checkpoint in ``store`` (if any) and the topics, through the same
    engine methods the worker calls, dropping what they would emit. Returns counts of what was
    restored and applied."""
    t0 = time.perf_counter()
    stats: dict[str, int] = defaultdict(int)
    floors: dict[tuple[str, int], int] = {}
    try:
        ckpt = store.load() if store is not None else None
        if ckpt is not None:
            engine.restore(ckpt.campaigns)
    except (LabloopError, ModelError, ValueError, KeyError, TypeError) as exc:
        log.error("%s; replaying from the start instead", exc)
        ckpt = None
    if ckpt is not None:
        floors = ckpt.floors
        stats["checkpointed_campaigns"] = len(ckpt.campaigns)
        stats["checkpoint_written_at_ms"] = int(ckpt.written_at * 1000)
        log.warning("loaded checkpoint of %d campaign(s), %.1fs old", len(ckpt.campaigns), time.time() - ckpt.written_at)
    c = Consumer({**kafka_config, "group.id": group_id, "enable.auto.commit": False, "fetch.wait.max.ms": 20})
    try:
        committed: dict[tuple[str, int], int] = {}
        parts = [TopicPartition(TOPICS[r].name, p) for r in _INPUTS for p in range(TOPICS[r].partitions)]
        for tp in c.committed(parts, timeout=30):
            if tp.offset > 0:
                committed[(tp.topic, tp.partition)] = tp.offset
        own = _read(c, [TopicPartition(TOPICS[r].name, p, 0) for r in _OWN for p in range(TOPICS[r].partitions)])
        if not committed and ckpt is None and not own:
            return dict(stats)  # a fresh group with no predecessor: nothing was processed before, nothing to rebuild
        # Explicit offsets avoid ListOffsets round trips; the group is not joined.
        to_end = {TOPICS[r].name for r in _TO_END}
        starts = {tp: floors.get(tp, 0) for tp in committed if tp[0] not in to_end}
        inputs = _read(c, [TopicPartition(t, p, o) for (t, p), o in starts.items() if o < committed[(t, p)]],
                       committed)
        inputs = [m for m in inputs if m.offset() < committed[(m.topic(), m.partition())]]
        # Definitions and compounds are read to their end, whatever was committed; so is any partition
        # with nothing committed (a predecessor killed before its first commit). The campaigns and pools
        # must be known before the requests they issued are re-adopted below, or those requests and
        # their statuses are refused and their ids issued again: Faust commits on an interval (2.8 s
        # by its default), and a worker stopped about 2 s after its pool of 302 compounds filled had committed
        # 2 of them and issued requests from the rest.
        # Registering them here emits nothing; Faust consumes them again, idempotently.
        fresh = [TopicPartition(TOPICS[r].name, p, floors.get((TOPICS[r].name, p), 0)) for r in _INPUTS
                 for p in range(TOPICS[r].partitions) if r in _TO_END or (TOPICS[r].name, p) not in committed]
        inputs += _read(c, fresh)
    finally:
        c.close()
    stats["replayed_messages"] = len(inputs)
    by_role: dict[str, list[Any]] = defaultdict(list)
    role_of = {TOPICS[r].name: r for r in (*_INPUTS, *_OWN)}
    for m in sorted([*inputs, *own], key=lambda m: (m.topic(), m.partition(), m.offset())):
        try:
            # Only the topic's own schemas: a record of another (a CompoundRegistered sent to the
            # readings topic) was dead-lettered when it first arrived, and must not be replayed.
            role = role_of[m.topic()]
            by_role[role].append((m, codec.decode(m.value() or b"", expect=TOPICS[role].schemas).record))
        except LabloopError:
            continue  # dead-lettered when it was first processed
    for _, r in by_role["campaigns"]:
        try:
            engine.define(r)
            stats["campaigns"] += 1
        except LabloopError:  # dead-lettered when it first arrived; the previous definition stands
            stats["invalid_definitions"] += 1
    pools: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, r in by_role["compounds"]:
        pools[r["campaign_id"]].append(r)
    for cid, recs in pools.items():
        rt = engine.get(cid)
        known = rt.index if rt is not None else {}
        recs = [r for r in recs if r["compound_id"] not in known]  # featurize only what the checkpoint lacks
        if not recs:
            continue
        mols, ok, _ = parse_many([r["smiles"] for r in recs], limits or MoleculeLimits())
        stats["compounds"] += engine.register(cid, [recs[i] for i in ok], featurize_mols(mols, spec))
    # Proposals, then the decisions on them, then what reached the robots (an approval whose
    # decision is past the committed offsets is known from its request).
    for _, r in by_role["proposals"]:
        if engine.replay_request(r, proposed=True):
            stats["proposals"] += 1
    for _, r in by_role["decisions"]:
        try:
            engine.decision(r, int(r["event_time"]))
            stats["decisions"] += 1
        except LabloopError:  # dead-lettered when it first arrived
            continue
    for _, r in by_role["requests"]:
        if engine.replay_request(r):
            stats["requests"] += 1
    for role in ("readings", "plates"):
        for m, r in by_role[role]:
            if not engine.defined(r["campaign_id"]):
                continue
            if role == "plates" and len(r["wells"]) > max_plate_wells:
                continue  # dead-lettered whole when it first arrived
            wells = r["wells"] if role == "plates" else [r]
            engine.readings(r["campaign_id"], r["assay_id"], r["unit"], wells, [(m.topic(), m.partition(), m.offset())])
            stats["readings"] += len(wells)
    for _, r in by_role["status"]:
        try:
            engine.status(r)
            stats["statuses"] += 1
        except LabloopError:  # dead-lettered when it first arrived
            continue
    for _, r in by_role["model_updates"]:
        engine.replay_model_update(r)
    stats["rebuild_ms"] = int((time.perf_counter() - t0) * 1000)
    log.warning("rebuilt %d campaign(s) from %s: %s", len(engine),
                "a checkpoint and Kafka" if ckpt is not None else "Kafka", dict(stats))
    return dict(stats)

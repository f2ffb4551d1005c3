"""Rebuild a worker's campaign state from Kafka before it starts consuming.

A worker keeps campaigns in memory. Its replacement (after a crash or a restart)
reads every input partition from the start up to the offsets its consumer group
committed, plus everything it ever published on the requests and model-updates
topics, and applies them without emitting anything. Faust then resumes at the
committed offsets, so every input event is applied exactly once (readings are
idempotent by ``reading_id`` in any case), issued requests stay pending until
they are answered, and model versions continue where they stopped.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from models import FeatureSpec, parse_many
from models.chem import featurize_mols
from schemas import TOPICS, Codec, LabloopError
from streams.campaign import CampaignRuntime

__all__ = ["rebuild"]

log = logging.getLogger("labloop.recovery")
_INPUTS = ("campaigns", "compounds", "readings", "plates", "status")
_OWN = ("requests", "model_updates")


def _read(c: Consumer, tps: list[TopicPartition], idle_s: float = 1.0) -> list[Any]:
    """Messages of ``tps`` from their offsets up to each one's ``stop`` (or until idle)."""
    if not tps:
        return []
    c.assign(tps)
    out: list[Any] = []
    idle = time.monotonic()
    while time.monotonic() - idle < idle_s:
        msgs = c.consume(10_000, 0.2)
        if msgs:
            idle = time.monotonic()
        out += [m for m in msgs if not m.error()]
    c.unassign()
    return out


def rebuild(campaigns: dict[str, CampaignRuntime], make: Any, kafka_config: dict[str, str], group_id: str,
            codec: Codec, spec: FeatureSpec) -> dict[str, int]:
    """Fill ``campaigns`` (via ``make(campaign_id)``) from the topics; returns counts of what was applied."""
    c = Consumer({**kafka_config, "group.id": group_id, "enable.auto.commit": False, "fetch.wait.max.ms": 20})
    try:
        committed: dict[tuple[str, int], int] = {}
        parts = [TopicPartition(TOPICS[r].name, p) for r in _INPUTS for p in range(TOPICS[r].partitions)]
        for tp in c.committed(parts, timeout=30):
            if tp.offset > 0:
                committed[(tp.topic, tp.partition)] = tp.offset
        stats: dict[str, int] = defaultdict(int)
        if not committed:
            return dict(stats)  # a fresh group: nothing was processed before, nothing to rebuild
        # Explicit offsets avoid ListOffsets round trips; the group is not joined.
        inputs = _read(c, [TopicPartition(t, p, 0) for (t, p) in committed])
        inputs = [m for m in inputs if m.offset() < committed[(m.topic(), m.partition())]]
        own = _read(c, [TopicPartition(TOPICS[r].name, p, 0) for r in _OWN for p in range(TOPICS[r].partitions)])
    finally:
        c.close()
    by_role: dict[str, list[Any]] = defaultdict(list)
    role_of = {TOPICS[r].name: r for r in (*_INPUTS, *_OWN)}
    for m in sorted([*inputs, *own], key=lambda m: (m.topic(), m.partition(), m.offset())):
        try:
            by_role[role_of[m.topic()]].append((m, codec.decode(m.value() or b"").record))
        except LabloopError:
            continue  # dead-lettered when it was first processed
    for _, r in by_role["campaigns"]:
        make(r["campaign_id"]).define(r)
        stats["campaigns"] += 1
    pools: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, r in by_role["compounds"]:
        pools[r["campaign_id"]].append(r)
    for cid, recs in pools.items():
        mols, ok, _ = parse_many([r["smiles"] for r in recs])
        stats["compounds"] += make(cid).add_compounds([recs[i] for i in ok], featurize_mols(mols, spec))
    for _, r in by_role["requests"]:
        rt = campaigns.get(r["campaign_id"])
        if rt is not None and rt.restore_request(r):
            stats["requests"] += 1
    for role in ("readings", "plates"):
        for m, r in by_role[role]:
            rt = campaigns.get(r["campaign_id"])
            if rt is None:
                continue
            wells = r["wells"] if role == "plates" else [r]
            rt.apply_readings(r["assay_id"], r["unit"], wells)
            rt.processed(m.topic(), m.partition(), m.offset())
            stats["readings"] += len(wells)
    for _, r in by_role["status"]:
        rt = campaigns.get(r["campaign_id"])
        if rt is not None and r["request_id"] in rt.requests:
            rt.on_status(r)
            stats["statuses"] += 1
    for _, r in by_role["model_updates"]:
        rt = campaigns.get(r["campaign_id"])
        if rt is not None and rt.pool is not None:
            rt.pool.model_version = max(rt.pool.model_version, int(r["model_version"]))
            rt.done_announced = rt.done_announced or bool(r["done"])
    log.warning("rebuilt %d campaign(s) from Kafka: %s", len(campaigns), dict(stats))
    return dict(stats)

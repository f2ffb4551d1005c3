"""The topic catalogue: every topic, what it carries, its key, partitions, retention.

All campaign traffic is keyed by ``campaign_id`` and has the same partition
count, so one campaign's compounds, readings and statuses are co-partitioned and
land on the same worker.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAMPAIGN_PARTITIONS", "TOPICS", "TopicSpec", "topic"]

CAMPAIGN_PARTITIONS = 4
_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """One Kafka topic.

    Attributes:
        role: short stable name used in code (``"readings"``).
        name: the Kafka topic name.
        schemas: short names of the records it may carry.
        key: the record field used as message key.
        partitions: partition count at creation.
        retention_ms: ``-1`` keeps forever.
        table: the ClickHouse table it lands in.
    """

    role: str
    name: str
    schemas: tuple[str, ...]
    key: str
    partitions: int
    retention_ms: int
    table: str
    description: str


TOPICS: dict[str, TopicSpec] = {
    t.role: t
    for t in (
        TopicSpec("campaigns", "labloop.campaigns", ("Campaign",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "campaigns", "campaign definitions"),
        TopicSpec("compounds", "labloop.compounds", ("CompoundRegistered",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "compounds", "compounds registered into a campaign pool by the LIMS"),
        TopicSpec("readings", "labloop.readings", ("AssayReading",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "readings", "single assay readings from instruments"),
        TopicSpec("plates", "labloop.plates", ("PlateReadout",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "readings", "whole-plate readouts; each well lands as a row of the readings table"),
        TopicSpec("predictions", "labloop.predictions", ("Prediction",), "campaign_id", CAMPAIGN_PARTITIONS,
                  7 * _DAY_MS, "predictions", "revised model predictions over the pool"),
        TopicSpec("requests", "labloop.requests", ("ExperimentRequest",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "requests", "experiment requests for robots"),
        TopicSpec("proposals", "labloop.proposals", ("ExperimentRequest",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "proposals", "requests of approval-gated campaigns, held until a person decides; robots never read it"),
        TopicSpec("decisions", "labloop.decisions", ("Decision",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "decisions", "people's approvals, rejections and priorities of proposed requests"),
        TopicSpec("status", "labloop.request-status", ("RequestStatus",), "campaign_id", CAMPAIGN_PARTITIONS, -1,
                  "request_status", "robot reports on requests"),
        TopicSpec("model_updates", "labloop.model-updates", ("ModelUpdate",), "campaign_id", CAMPAIGN_PARTITIONS,
                  -1, "model_updates", "one event per model update"),
        TopicSpec("dead_letters", "labloop.dead-letters", ("DeadLetter",), "source_topic", 1, 30 * _DAY_MS,
                  "dead_letters", "events that could not be processed, with provenance"),
    )
}


def topic(role: str) -> TopicSpec:
    """The spec of the topic with this role."""
    return TOPICS[role]

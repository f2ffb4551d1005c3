"""One worker's input progress: offsets handled, checkpoint floors, lag, and whether a checkpoint is due.

A checkpoint may only claim what was handled: per input topic-partition, the *floor* is an
offset below which every message was handled when the snapshots were taken (a batch in
progress holds its partition's floor at its first offset). Replaying from the floors is
harmless because every engine method is idempotent, so a floor only has to be low enough.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Progress", "Span"]

TopicPartition = tuple[str, int]
Span = tuple[str, int, int, int]  # topic, partition, first offset, last offset of a micro-batch


@dataclass
class Progress:
    """Offsets, floors, lag and checkpoint due-ness of one worker's inputs.

    Args:
        interval_s: seconds between checkpoints (0: never).
        backlog_messages: an input further behind its high watermark than this is a backlog.
    """

    interval_s: float
    backlog_messages: int
    floors: dict[TopicPartition, int] = field(default_factory=dict)
    # Per reading-carrying input partition: messages behind its high watermark after the last batch.
    lag: dict[TopicPartition, int] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # campaigns changed since their last snapshot
    dirty: bool = False  # anything handled since the last checkpoint

    def handling(self, spans: Iterable[Span]) -> None:
        """A batch starts: on each of its partitions, everything below its first offset was handled."""
        for topic, partition, first, _ in spans:
            self.floors[(topic, partition)] = first
        self.dirty = True

    def handled(self, spans: Iterable[Span]) -> None:
        """A batch is done: its partitions are handled up to its last offset."""
        for topic, partition, _, last in spans:
            key = (topic, partition)
            self.floors[key] = max(self.floors[key], last + 1)

    def observed(self, topic: str, partition: int, lag: int) -> None:
        """A partition was ``lag`` messages behind its high watermark after its last batch."""
        self.lag[(topic, partition)] = lag

    def behind(self) -> bool:
        """Whether a readings input is more than ``backlog_messages`` behind."""
        return max(self.lag.values(), default=0) > self.backlog_messages

    def touch(self, campaign_id: str) -> None:
        """The campaign's state changed: its next checkpoint stores it again."""
        self.changed.add(campaign_id)

    def due(self) -> bool:
        """Whether a checkpoint has anything to store."""
        return self.interval_s > 0 and (self.dirty or bool(self.changed))

    def begin(self) -> dict[TopicPartition, int]:
        """A checkpoint starts: the floors it may claim (taken first, so every later snapshot holds
        at least this much)."""
        self.dirty = False
        return dict(self.floors)

    def snapshotted(self, campaign_id: str) -> None:
        """The campaign's snapshot was taken (changes after it count for the next checkpoint)."""
        self.changed.discard(campaign_id)

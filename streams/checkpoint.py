"""Worker checkpoints: every campaign's state on disk, so a replacement resumes rather than replays.

A checkpoint holds, per campaign, the pickled :class:`~streams.campaign.CampaignRuntime`
(pool fingerprints, measured / pending / failed sets, requests, seen reading ids, and the
fitted learner itself), plus the *floors*: per input topic-partition, an offset below which
the worker had handled every message before it took the snapshots. A replacement loads the
checkpoint and replays only the input messages from the floors on (see
:mod:`streams.recovery`). Replaying a message that the snapshot already holds is harmless:
every handler is idempotent (compounds by id, readings by ``reading_id``, statuses by request
state), so floors only need to be low enough, never exact.

The file is written atomically (temporary file, fsync, rename) and names the Kafka cluster
and consumer group it belongs to: a checkpoint from another cluster (a fresh embedded
broker restarts offsets at 0) or another group is ignored.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import LabloopError

__all__ = ["Checkpoint", "CheckpointError", "CheckpointStore"]

log = logging.getLogger("labloop.checkpoint")
FORMAT = 1


class CheckpointError(LabloopError):
    """A checkpoint file exists but cannot be used."""


@dataclass(frozen=True)
class Checkpoint:
    """What a worker restores: ``campaigns`` (id -> runtime) and ``floors`` ((topic, partition) -> offset)."""

    campaigns: dict[str, Any]
    floors: dict[tuple[str, int], int]
    written_at: float


class CheckpointStore:
    """One worker's checkpoint file.

    Args:
        path: the file (its directory is created).
        cluster_id: the Kafka cluster's id; offsets mean nothing on another cluster.
        group_id: the worker's consumer group.
    """

    def __init__(self, path: Path, cluster_id: str, group_id: str) -> None:
        self.path, self.cluster_id, self.group_id = path, cluster_id, group_id
        self.written = 0
        self.last_bytes = 0

    def write(self, floors: dict[tuple[str, int], int], campaigns: dict[str, bytes]) -> None:
        """Store pickled campaigns (``campaign_id -> pickle bytes``) and their floors, atomically."""
        blob = pickle.dumps({"format": FORMAT, "cluster_id": self.cluster_id, "group_id": self.group_id,
                             "written_at": time.time(), "floors": floors, "campaigns": campaigns},
                            protocol=pickle.HIGHEST_PROTOCOL)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.written += 1
        self.last_bytes = len(blob)

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None when there is none for this cluster and group."""
        if not self.path.exists():
            return None
        try:
            data = pickle.loads(self.path.read_bytes())  # noqa: S301 - the worker's own file, trusted like its data dir
            if data.get("format") != FORMAT:
                raise CheckpointError(f"format {data.get('format')!r}, expected {FORMAT}")
            if (data["cluster_id"], data["group_id"]) != (self.cluster_id, self.group_id):
                log.warning("ignoring checkpoint %s: it belongs to cluster %s / group %s", self.path,
                            data["cluster_id"], data["group_id"])
                return None
            campaigns = {cid: pickle.loads(b) for cid, b in data["campaigns"].items()}  # noqa: S301
        except CheckpointError:
            raise
        except Exception as exc:  # a torn or foreign file: say which, and fall back to a full replay
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from exc
        return Checkpoint(campaigns, dict(data["floors"]), float(data["written_at"]))

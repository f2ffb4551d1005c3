"""Worker checkpoints: every campaign's state on disk, so a replacement resumes rather than replays.

A checkpoint holds, per campaign, the pickled :class:`~labloop.streams.campaign.CampaignRuntime`
(pool fingerprints, measured / pending / failed sets, requests, seen reading ids, and the
fitted learner itself), plus the *floors*: per input topic-partition, an offset below which
the worker had handled every message before it took the snapshots. A replacement loads the
checkpoint and replays only the input messages from the floors on (see
:mod:`labloop.streams.recovery`). Replaying a message that the snapshot already holds is harmless:
every handler is idempotent (compounds by id, readings by ``reading_id``, statuses by request
state), so floors only need to be low enough, never exact.

A checkpoint is a directory: one file per campaign, re-written only when the campaign
changed, and an index (floors, campaign files, the Kafka cluster and consumer group)
written after them. Every file is written atomically (temporary file, fsync, rename), so
a crash leaves either the old index or the new one; campaign files newer than the index
only make the floors conservative. A checkpoint from another cluster (a fresh embedded
broker restarts offsets at 0) or another group is ignored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labloop.schemas import LabloopError

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
    """One worker's checkpoint directory.

    Args:
        path: the directory (created on the first write).
        cluster_id: the Kafka cluster's id; offsets mean nothing on another cluster.
        group_id: the worker's consumer group.
    """

    def __init__(self, path: Path, cluster_id: str, group_id: str) -> None:
        self.path, self.cluster_id, self.group_id = path, cluster_id, group_id
        self.written = 0
        self.last_bytes = 0  # bytes written by the last checkpoint
        self._files: dict[str, str] = {}  # campaign id -> its file in the current index

    def _file_of(self, campaign_id: str) -> str:
        return f"campaign-{hashlib.sha1(campaign_id.encode(), usedforsecurity=False).hexdigest()[:20]}.pkl"

    def _put(self, name: str, data: bytes) -> None:
        tmp = self.path / f"{name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / name)

    def has(self, campaign_id: str) -> bool:
        """Whether the current checkpoint holds a snapshot of the campaign."""
        return campaign_id in self._files

    def write(self, floors: dict[tuple[str, int], int], changed: dict[str, bytes], campaigns: list[str]) -> None:
        """Store the pickled ``changed`` campaigns (``campaign_id -> pickle bytes``), then the index
        naming every one of ``campaigns`` (each must be changed or held already) and the floors."""
        self.path.mkdir(parents=True, exist_ok=True)
        missing = [c for c in campaigns if c not in changed and c not in self._files]
        if missing:
            raise CheckpointError(f"no snapshot of campaign(s) {missing[:5]}")
        for cid, blob in changed.items():
            self._put(self._file_of(cid), blob)
        files = {cid: self._file_of(cid) for cid in campaigns}
        index = pickle.dumps({"format": FORMAT, "cluster_id": self.cluster_id, "group_id": self.group_id,
                              "written_at": time.time(), "floors": floors, "campaigns": files},
                             protocol=pickle.HIGHEST_PROTOCOL)
        self._put("index.pkl", index)
        self._files = files
        self.written += 1
        self.last_bytes = len(index) + sum(map(len, changed.values()))

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None when there is none for this cluster and group."""
        index = self.path / "index.pkl"
        if not index.exists():
            return None
        try:
            data = pickle.loads(index.read_bytes())  # noqa: S301 - the worker's own file, trusted like its data dir
            if data.get("format") != FORMAT:
                raise CheckpointError(f"format {data.get('format')!r}, expected {FORMAT}")
            if (data["cluster_id"], data["group_id"]) != (self.cluster_id, self.group_id):
                log.warning("ignoring checkpoint %s: it belongs to cluster %s / group %s", self.path,
                            data["cluster_id"], data["group_id"])
                return None
            campaigns = {cid: pickle.loads((self.path / name).read_bytes())  # noqa: S301
                         for cid, name in data["campaigns"].items()}
        except CheckpointError:
            raise
        except Exception as exc:  # a torn or foreign file: say which, and fall back to a full replay
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from exc
        self._files = dict(data["campaigns"])
        return Checkpoint(campaigns, dict(data["floors"]), float(data["written_at"]))

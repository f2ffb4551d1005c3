"""Worker checkpoints: every campaign's state on disk, so a replacement resumes rather than replays.

A checkpoint holds, per campaign, its :meth:`~labloop.streams.campaign.CampaignRuntime.state_dict`
(pool fingerprints, measured / pending / failed sets, requests, seen reading ids, and the
learner's training data), plus the *floors*: per input topic-partition, an offset below which
the worker had handled every message before it took the snapshots. A replacement loads the
checkpoint and replays only the input messages from the floors on (see
:mod:`labloop.streams.recovery`). Replaying a message that the snapshot already holds is
harmless: every handler is idempotent (compounds by id, readings by ``reading_id``, statuses by
request state), so floors only need to be low enough, never exact.

The format is data, never code (format 2): a directory with one ``.npz`` archive per campaign
(arrays, and the metadata as JSON inside it; :mod:`labloop.models.state`), re-written only when
the campaign changed, and ``index.json`` (format, floors, campaign files, the Kafka cluster and
consumer group) written after them. Loading uses ``numpy.load(allow_pickle=False)`` and
``json.loads``: a crafted file can fail to load, not run code. Every file is written
atomically (temporary file, fsync, rename) and readable by its owner only, so a crash leaves
either the old index or the new one; campaign files newer than the index only make the floors
conservative. A checkpoint from another cluster or group is ignored. Format 1 (pickles, before
labloop 0.2) is refused with a message, and the worker replays from the log instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labloop.models.state import StateError, loads
from labloop.schemas import LabloopError

__all__ = ["Checkpoint", "CheckpointError", "CheckpointStore"]

log = logging.getLogger("labloop.checkpoint")
FORMAT = 2
INDEX = "index.json"
LEGACY_INDEX = "index.pkl"  # format 1


class CheckpointError(LabloopError):
    """A checkpoint exists but cannot be used (torn, foreign, or of a format no longer loaded)."""


@dataclass(frozen=True)
class Checkpoint:
    """What a worker restores: ``campaigns`` (id -> state tree, as
    :meth:`~labloop.streams.campaign.CampaignRuntime.from_state` takes it) and ``floors``
    ((topic, partition) -> offset)."""

    campaigns: dict[str, Any]
    floors: dict[tuple[str, int], int]
    written_at: float


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable and writable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """One worker's checkpoint directory.

    Args:
        path: the directory (created owner-only on the first write).
        cluster_id: the Kafka cluster's id; offsets mean nothing on another cluster.
        group_id: the worker's consumer group.
    """

    def __init__(self, path: Path, cluster_id: str, group_id: str) -> None:
        self.path, self.cluster_id, self.group_id = path, cluster_id, group_id
        self.written = 0
        self.last_bytes = 0  # bytes written by the last checkpoint
        self._files: dict[str, str] = {}  # campaign id -> its file in the current index

    def _file_of(self, campaign_id: str) -> str:
        return f"campaign-{hashlib.sha1(campaign_id.encode(), usedforsecurity=False).hexdigest()[:20]}.npz"

    def has(self, campaign_id: str) -> bool:
        """Whether the current checkpoint holds a snapshot of the campaign."""
        return campaign_id in self._files

    def write(self, floors: dict[tuple[str, int], int], changed: dict[str, bytes], campaigns: list[str]) -> None:
        """Store the ``changed`` campaigns (``campaign_id -> bytes`` of
        :func:`labloop.models.state.dumps`), then the index naming every one of ``campaigns``
        (each must be changed or held already) and the floors."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        missing = [c for c in campaigns if c not in changed and c not in self._files]
        if missing:
            raise CheckpointError(f"no snapshot of campaign(s) {missing[:5]}")
        for cid, blob in changed.items():
            _write_private(self.path / self._file_of(cid), blob)
        files = {cid: self._file_of(cid) for cid in campaigns}
        index = json.dumps({"format": FORMAT, "cluster_id": self.cluster_id, "group_id": self.group_id,
                            "written_at": time.time(), "floors": [[t, p, o] for (t, p), o in sorted(floors.items())],
                            "campaigns": files}).encode()
        _write_private(self.path / INDEX, index)
        self._files = files
        self.written += 1
        self.last_bytes = len(index) + sum(map(len, changed.values()))

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None when there is none for this cluster and group.

        Raises:
            CheckpointError: a torn or malformed checkpoint, or one in the old pickle format.
        """
        index = self.path / INDEX
        if not index.exists():
            if (self.path / LEGACY_INDEX).exists():
                raise CheckpointError(
                    f"checkpoint {self.path} is in format 1 (Python pickles), which labloop no longer loads because "
                    f"unpickling a file can run any code in it; the worker rebuilds its campaigns from the Kafka log "
                    f"instead, and its next checkpoint is written in format {FORMAT}. Remove {LEGACY_INDEX} and the "
                    f"campaign-*.pkl files there once it has")
            return None
        try:
            data = json.loads(index.read_bytes())
            if data.get("format") != FORMAT:
                raise CheckpointError(f"checkpoint {self.path}: format {data.get('format')!r}, expected {FORMAT}")
            if (data["cluster_id"], data["group_id"]) != (self.cluster_id, self.group_id):
                log.warning("ignoring checkpoint %s: it belongs to cluster %s / group %s", self.path,
                            data["cluster_id"], data["group_id"])
                return None
            files = {str(cid): str(name) for cid, name in data["campaigns"].items()}
            for name in files.values():
                if Path(name).name != name or not name.endswith(".npz"):  # never a path out of the directory
                    raise CheckpointError(f"checkpoint {self.path}: bad campaign file name {name!r}")
            campaigns = {cid: loads((self.path / name).read_bytes()) for cid, name in files.items()}
            floors = {(str(t), int(p)): int(o) for t, p, o in data["floors"]}
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError, StateError) as exc:  # torn or foreign: say which
            raise CheckpointError(f"cannot read checkpoint {self.path}: {exc}") from exc
        self._files = files
        return Checkpoint(campaigns, floors, float(data["written_at"]))

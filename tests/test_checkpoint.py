"""Checkpoints: a campaign file per campaign, an index written last, only for its own cluster and group."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from streams.campaign import CampaignRuntime
from streams.checkpoint import CheckpointError, CheckpointStore


def _runtime(cid: str, reading: str) -> bytes:
    rt = CampaignRuntime(cid)
    rt.seen_readings.add(reading)
    return pickle.dumps(rt)


def test_a_checkpoint_round_trips_for_its_own_cluster_and_group_only(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "w-0"
    store = CheckpointStore(path, "cluster-a", "g")
    store.write({("labloop.readings", 2): 17}, {"c1": _runtime("c1", "r1"), "c2": _runtime("c2", "r2")}, ["c1", "c2"])
    first = len(list(path.iterdir()))
    # The next checkpoint re-writes only what changed; unchanged c2 keeps its file.
    store.write({("labloop.readings", 2): 30}, {"c1": _runtime("c1", "r3")}, ["c1", "c2"])
    assert len(list(path.iterdir())) == first == 3  # two campaign files and the index
    ck = CheckpointStore(path, "cluster-a", "g").load()
    assert ck is not None and ck.floors == {("labloop.readings", 2): 30}
    assert ck.campaigns["c1"].seen_readings == {"r3"} and ck.campaigns["c2"].seen_readings == {"r2"}
    assert CheckpointStore(path, "cluster-b", "g").load() is None  # a fresh broker: offsets mean nothing
    assert CheckpointStore(path, "cluster-a", "other").load() is None
    assert CheckpointStore(tmp_path / "none", "cluster-a", "g").load() is None


def test_a_campaign_without_a_snapshot_cannot_be_left_out(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "w", "c", "g")
    with pytest.raises(CheckpointError, match="no snapshot"):
        store.write({}, {"c1": _runtime("c1", "r")}, ["c1", "c2"])


def test_a_torn_checkpoint_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "w"
    CheckpointStore(path, "c", "g").write({}, {"c1": _runtime("c1", "r")}, ["c1"])
    next(p for p in path.iterdir() if p.name.startswith("campaign-")).write_bytes(b"\x80\x05 not a whole pickle")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        CheckpointStore(path, "c", "g").load()

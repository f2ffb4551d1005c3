"""Checkpoint files: atomic, and only for the cluster and group that wrote them."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from streams.campaign import CampaignRuntime
from streams.checkpoint import CheckpointError, CheckpointStore


def test_a_checkpoint_round_trips_for_its_own_cluster_and_group_only(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "w-0.ckpt"
    rt = CampaignRuntime("c1")
    rt.seen_readings.add("r1")
    CheckpointStore(path, "cluster-a", "g").write({("labloop.readings", 2): 17}, {"c1": pickle.dumps(rt)})
    ck = CheckpointStore(path, "cluster-a", "g").load()
    assert ck is not None and ck.floors == {("labloop.readings", 2): 17}
    assert ck.campaigns["c1"].seen_readings == {"r1"}
    assert CheckpointStore(path, "cluster-b", "g").load() is None  # a fresh broker: offsets mean nothing
    assert CheckpointStore(path, "cluster-a", "other").load() is None
    assert CheckpointStore(tmp_path / "none.ckpt", "cluster-a", "g").load() is None


def test_a_torn_checkpoint_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "w.ckpt"
    path.write_bytes(b"\x80\x05 not a whole pickle")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        CheckpointStore(path, "c", "g").load()

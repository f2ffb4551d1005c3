"""Checkpoints: a campaign file per campaign, an index written last, only for its own cluster and group."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from labloop.streams.campaign import CampaignRuntime
from labloop.streams.checkpoint import CheckpointError, CheckpointStore


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


def _defined(cid: str) -> CampaignRuntime:
    from labloop.models import featurize

    rt = CampaignRuntime(cid, device="cpu")
    rt.define({"campaign_id": cid, "objective_assay_id": "a", "direction": "MINIMIZE", "unit": "nM", "batch_size": 2,
               "init_size": 2, "budget": 8, "min_pool_size": 0, "policy": "ucb", "learner": "gp",
               "schedule": "ROUNDS", "request_ttl_s": 60.0, "seed": 1, "event_time": 0})
    smiles = ["CCO", "CCN", "c1ccccc1", "CC(=O)O"]
    rt.add_compounds([{"compound_id": f"X{i}", "smiles": s} for i, s in enumerate(smiles)], featurize(smiles))
    return rt


def _reading(rid: str, compound: str) -> dict[str, object]:
    return {"reading_id": rid, "compound_id": compound, "value": 1.0, "request_id": None}


def test_seen_readings_are_checkpointed_incrementally_and_completely() -> None:
    rt = _defined("c1")
    assert rt.apply_readings("a", "nM", [_reading(f"r{i}", f"X{i % 4}") for i in range(50)]) == []
    first = pickle.dumps(rt)
    assert rt.apply_readings("a", "nM", [_reading(f"r{i}", "X1") for i in range(40, 60)]) == []  # 10 new, 10 seen
    second = pickle.loads(pickle.dumps(rt))
    assert second.seen_readings == {f"r{i}" for i in range(60)} and len(second._seen_chunks) == 2
    assert pickle.loads(first).seen_readings == {f"r{i}" for i in range(50)}  # the earlier snapshot is unchanged
    # The restored runtime goes on packing only what is new, and a re-sent reading still counts once.
    assert second.apply_readings("a", "nM", [_reading("r60", "X2"), _reading("r3", "X3")]) == []
    third = pickle.loads(pickle.dumps(second))
    assert third.seen_readings == {f"r{i}" for i in range(61)} and len(third._seen_chunks) == 3
    assert third.n_readings == 61


def test_seen_readings_changed_directly_are_packed_whole() -> None:
    rt = _defined("c1")
    rt.apply_readings("a", "nM", [_reading("r1", "X0")])
    pickle.dumps(rt)
    rt.seen_readings.add("outside")  # not through apply_readings: the chunks no longer add up
    again = pickle.loads(pickle.dumps(rt))
    assert again.seen_readings == {"r1", "outside"} and len(again._seen_chunks) == 1

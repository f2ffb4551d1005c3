"""Checkpoints: data, never code; a file per campaign, an index written last, for its own cluster and group only."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from labloop.models.state import dumps, loads
from labloop.streams.campaign import CampaignRuntime
from labloop.streams.checkpoint import CheckpointError, CheckpointStore
from labloop.streams.definition import CampaignSpec
from labloop.streams.engine import CampaignEngine

LEGACY = Path(__file__).parent / "data" / "checkpoint_pickle_v1"  # written by labloop 0.1's worker code


def _runtime(cid: str, reading: str) -> bytes:
    rt = CampaignRuntime(cid)
    rt.seen_readings.add(reading)
    return dumps(rt.state_dict())


def _seen(state: object) -> set[str]:
    assert isinstance(state, dict)
    return CampaignRuntime.from_state(state).seen_readings


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
    assert _seen(ck.campaigns["c1"]) == {"r3"} and _seen(ck.campaigns["c2"]) == {"r2"}
    assert CheckpointStore(path, "cluster-b", "g").load() is None  # another cluster: offsets mean nothing
    assert CheckpointStore(path, "cluster-a", "other").load() is None
    assert CheckpointStore(tmp_path / "none", "cluster-a", "g").load() is None


def test_checkpoint_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "w"
    CheckpointStore(path, "c", "g").write({}, {"c1": _runtime("c1", "r")}, ["c1"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o600}


def test_a_campaign_without_a_snapshot_cannot_be_left_out(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "w", "c", "g")
    with pytest.raises(CheckpointError, match="no snapshot"):
        store.write({}, {"c1": _runtime("c1", "r")}, ["c1", "c2"])


def test_a_torn_checkpoint_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "w"
    CheckpointStore(path, "c", "g").write({}, {"c1": _runtime("c1", "r")}, ["c1"])
    next(p for p in path.iterdir() if p.name.startswith("campaign-")).write_bytes(b"PK\x03\x04 not a whole archive")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        CheckpointStore(path, "c", "g").load()


def test_the_old_pickle_format_is_refused_without_running_it(tmp_path: Path) -> None:
    """A checkpoint of labloop 0.1 (pickles), committed as a fixture, is refused with a message that says
    the worker replays from the log; a pickle with a code-running payload beside it runs nothing."""
    path = tmp_path / "legacy"
    shutil.copytree(LEGACY, path)
    assert (path / "index.pkl").exists()
    with pytest.raises(CheckpointError, match=r"format 1 \(Python pickles\).*rebuilds its campaigns from the Kafka log"):
        CheckpointStore(path, "cluster-legacy", "labloop-worker").load()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    (path / "index.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="format 1"):
        CheckpointStore(path, "cluster-legacy", "labloop-worker").load()
    assert not marker.exists()


def test_crafted_checkpoint_files_fail_to_load_and_run_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w"
    store = CheckpointStore(path, "c", "g")
    store.write({}, {"c1": _runtime("c1", "r")}, ["c1"])
    campaign = next(p for p in path.iterdir() if p.name.startswith("campaign-"))
    # An object array in the archive would need pickle to load: refused.
    with zipfile.ZipFile(campaign, "a") as z, z.open("s/evil.npy", "w") as fh:
        np.lib.format.write_array(fh, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        CheckpointStore(path, "c", "g").load()
    # An index that names a file outside its directory: refused.
    index = json.loads((path / "index.json").read_text())
    index["campaigns"]["c1"] = "../../outside.npz"
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="bad campaign file name"):
        CheckpointStore(path, "c", "g").load()


def test_the_old_format_makes_the_worker_replay_from_the_log(tmp_path: Path, broker, codec, caplog) -> None:  # type: ignore[no-untyped-def]
    from labloop.models import FeatureSpec
    from labloop.streams.recovery import rebuild
    from labloop.streams.runtime import ensure_topics

    conf = {"bootstrap.servers": broker.bootstrap}
    ensure_topics(conf)
    path = tmp_path / "legacy"
    shutil.copytree(LEGACY, path)
    engine = CampaignEngine(device="cpu")
    with caplog.at_level("ERROR", logger="labloop.recovery"):
        rebuild(engine, conf, "legacy-group", codec, FeatureSpec(), CheckpointStore(path, "cluster-legacy", "legacy-group"))
    assert "format 1" in caplog.text and "replaying from the start instead" in caplog.text
    assert len(engine) == 0  # nothing came from the pickles; the (empty) log was the source


def _defined(cid: str) -> CampaignRuntime:
    from labloop.models import featurize

    rt = CampaignRuntime(cid, device="cpu")
    rt.define(CampaignSpec(cid, "a", "nM", direction="MINIMIZE", batch_size=2, init_size=2, budget=8,
                           request_ttl_s=60.0, seed=1).to_record(0))
    smiles = ["CCO", "CCN", "c1ccccc1", "CC(=O)O"]
    rt.add_compounds([{"compound_id": f"X{i}", "smiles": s} for i, s in enumerate(smiles)], featurize(smiles))
    return rt


def _reading(rid: str, compound: str) -> dict[str, object]:
    return {"reading_id": rid, "compound_id": compound, "value": 1.0, "request_id": None}


def _round_trip(rt: CampaignRuntime) -> CampaignRuntime:
    return CampaignRuntime.from_state(loads(dumps(rt.state_dict())), device="cpu")


def test_a_campaign_round_trips_whole() -> None:
    rt = _defined("c1")
    rt.apply_readings("a", "nM", [_reading("r1", "X0"), _reading("r2", "X3")])
    rt.pool.retrain()  # type: ignore[union-attr]
    sent = rt.requests_now("cpu")
    assert sent and rt.requests
    back = _round_trip(rt)
    assert back.definition == rt.definition and back.compound_ids == rt.compound_ids and back.smiles == rt.smiles
    assert back.index == rt.index and back.seen_readings == rt.seen_readings
    assert {k: vars(v) for k, v in back.requests.items()} == {k: vars(v) for k, v in rt.requests.items()}
    assert (back.n_requested, back.n_issued, back.n_batches, back.n_readings) == \
        (rt.n_requested, rt.n_issued, rt.n_batches, rt.n_readings)
    assert back.model_offsets == rt.model_offsets and back.applied_offsets == rt.applied_offsets
    assert back.pool is not None and rt.pool is not None
    np.testing.assert_array_equal(back.pool.status, rt.pool.status)
    np.testing.assert_allclose(back.pool.predict_pool()[0], rt.pool.predict_pool()[0], rtol=0, atol=1e-9)
    # Both go on identically: the same next requests.
    for r in (rt, back):
        r.apply_readings("a", "nM", [{**_reading(f"q{i}", r.compound_ids[r.requests[k].index]), "request_id": k}
                                     for i, k in enumerate(sorted(r.requests))])
        r.pool.retrain()  # type: ignore[union-attr]
    assert [e.record["compound_id"] for e in back.requests_now("cpu")] == \
        [e.record["compound_id"] for e in rt.requests_now("cpu")]


def test_seen_readings_are_checkpointed_incrementally_and_completely() -> None:
    rt = _defined("c1")
    assert rt.apply_readings("a", "nM", [_reading(f"r{i}", f"X{i % 4}") for i in range(50)]) == []
    first = dumps(rt.state_dict())
    assert rt.apply_readings("a", "nM", [_reading(f"r{i}", "X1") for i in range(40, 60)]) == []  # 10 new, 10 seen
    second = _round_trip(rt)
    assert second.seen_readings == {f"r{i}" for i in range(60)} and len(second._seen_chunks) == 2
    assert CampaignRuntime.from_state(loads(first)).seen_readings == {f"r{i}" for i in range(50)}  # unchanged
    # The restored runtime goes on packing only what is new, and a re-sent reading still counts once.
    assert second.apply_readings("a", "nM", [_reading("r60", "X2"), _reading("r3", "X3")]) == []
    third = _round_trip(second)
    assert third.seen_readings == {f"r{i}" for i in range(61)} and len(third._seen_chunks) == 3
    assert third.n_readings == 61


def test_seen_readings_changed_directly_are_packed_whole() -> None:
    rt = _defined("c1")
    rt.apply_readings("a", "nM", [_reading("r1", "X0")])
    rt.state_dict()
    rt.seen_readings.add("outside")  # not through apply_readings: the chunks no longer add up
    again = _round_trip(rt)
    assert again.seen_readings == {"r1", "outside"} and len(again._seen_chunks) == 1

"""The campaign engine alone, with no broker: a whole small campaign, its replay, and its bad inputs."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labloop.models import featurize
from labloop.models.state import dumps, loads
from labloop.schemas import InvalidEvent
from labloop.streams.definition import AssayRange, CampaignSpec, InvalidDefinition
from labloop.streams.engine import CampaignEngine

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID = "engine-it"


def _pool(n: int = 60) -> tuple[list[dict[str, Any]], dict[str, float]]:
    with open(DATA) as fh:
        rows = list(csv.DictReader(fh))[:n]
    records = [{"campaign_id": CID, "compound_id": f"C{i:03d}", "smiles": r["smiles"]} for i, r in enumerate(rows)]
    return records, {f"C{i:03d}": float(r["tpsa"]) for i, r in enumerate(rows)}


def _spec(**over: Any) -> CampaignSpec:
    base: dict[str, Any] = {"batch_size": 5, "init_size": 5, "budget": 20, "min_pool_size": 60, "seed": 3,
                            "request_ttl_s": 600.0, "ranges": (AssayRange("tpsa", 0.0, 1000.0),)}
    return CampaignSpec(CID, "tpsa", "A^2", **{**base, **over})


def _run(engine: CampaignEngine, oracle: dict[str, float], log: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Drive the engine as the worker does until the campaign reports done; ``log`` collects
    every input the engine was given, for a replay."""
    for _ in range(50):
        update = engine.take_update(CID)
        if update is not None:
            out = engine.commit_update(CID, update, engine.fit(CID, update), 0.0, "cpu")
        else:
            out = engine.decide(CID, "cpu")
        for e in out:
            if e.name == "ExperimentRequest":
                log.append(("request", e.record))
                r = e.record
                reading = {"reading_id": f"rd-{r['request_id']}", "compound_id": r["compound_id"],
                           "value": oracle[r["compound_id"]], "request_id": r["request_id"]}
                log.append(("reading", reading))
                assert engine.readings(CID, "tpsa", "A^2", [reading], [("labloop.readings", 0, len(log))]) == []
            elif e.name == "ModelUpdate":
                log.append(("model_update", e.record))
                if e.record["done"]:
                    return e.record
    raise AssertionError("the campaign did not finish")


def test_a_whole_campaign_runs_on_the_engine_alone() -> None:
    records, oracle = _pool()
    engine = CampaignEngine(device="cpu")
    engine.register(CID, records[:30], featurize([r["smiles"] for r in records[:30]]))  # before the definition
    engine.define(_spec().to_record(0))
    engine.register(CID, records[30:], featurize([r["smiles"] for r in records[30:]]))
    log: list[tuple[str, dict[str, Any]]] = []
    final = _run(engine, oracle, log)
    requested = [r for kind, r in log if kind == "request"]
    assert final["n_requested"] == 20 and final["n_measured"] == 20 and len({r["compound_id"] for r in requested}) == 20
    assert len({r["request_id"] for r in requested}) == 20 and final["model_version"] >= 4
    # Past the random start the model chose: its batches beat the random first one on average.
    by_batch = {b: np.mean([oracle[r["compound_id"]] for r in requested if r["batch"] == b]) for b in range(4)}
    assert max(by_batch[b] for b in (1, 2, 3)) > by_batch[0]
    assert engine.decide(CID, "cpu") == []  # done: nothing more, and the final report is not repeated


def test_a_replay_through_the_engine_rebuilds_the_same_campaign() -> None:
    """Recovery's path: the inputs and the loop's own outputs again, through the same methods, emits dropped."""
    records, oracle = _pool()
    X = featurize([r["smiles"] for r in records])
    first = CampaignEngine(device="cpu")
    first.define(_spec(budget=15).to_record(0))
    first.register(CID, records, X)
    log: list[tuple[str, dict[str, Any]]] = []
    _run(first, oracle, log)
    second = CampaignEngine(device="cpu")
    second.define(_spec(budget=15).to_record(0))
    second.register(CID, records, X)
    for kind, r in log:
        if kind == "request":
            assert second.replay_request(r)
    for kind, r in log:
        if kind == "reading":
            assert second.readings(CID, "tpsa", "A^2", [r]) == []
        elif kind == "model_update":
            second.replay_model_update(r)
    a, b = first.get(CID), second.get(CID)
    assert a is not None and b is not None and a.pool is not None and b.pool is not None
    assert (b.n_requested, b.n_issued, b.n_readings, b.done_announced) == (a.n_requested, a.n_issued, a.n_readings, True)
    assert b.pool.model_version == a.pool.model_version
    np.testing.assert_array_equal(b.pool.status, a.pool.status)
    assert second.decide(CID, "cpu") == []  # finished, and known to be reported finished
    # And the checkpoint path: the state as data, restored into a fresh engine.
    third = CampaignEngine(device="cpu")
    third.restore({CID: loads(dumps(first.state_dict(CID)))})
    c = third.get(CID)
    assert c is not None and c.seen_readings == a.seen_readings and c.requests.keys() == a.requests.keys()


@pytest.mark.parametrize(("field", "value"), [
    ("policy", "no-such-policy"), ("learner", "no-such-learner"), ("seed", -1), ("request_ttl_s", math.nan),
    ("request_ttl_s", 1e300), ("request_ttl_s", -5.0), ("batch_size", 0), ("budget", -1), ("batch_size", 10**7),
    ("init_size", -3), ("campaign_id", ""), ("unit", "x" * 500)])
def test_an_invalid_definition_names_its_field_and_changes_nothing(field: str, value: Any) -> None:
    engine = CampaignEngine(device="cpu")
    rec = {**_spec().to_record(0), field: value}
    with pytest.raises(InvalidDefinition) as err:
        engine.define(rec)
    assert err.value.field == field and field in str(err.value)
    assert len(engine) == 0  # no state for a campaign never validly defined
    engine.define(_spec().to_record(0))
    with pytest.raises(InvalidDefinition):  # and a bad redefinition leaves the good one in force
        engine.define({**_spec(budget=7).to_record(0), field: value} if field != "campaign_id" else
                      {**_spec(budget=7).to_record(0), "batch_size": 0})
    rt = engine.get(CID)
    assert rt is not None and rt.definition is not None and rt.definition.budget == 20


def test_a_running_campaign_keeps_what_it_is_built_on() -> None:
    engine = CampaignEngine(device="cpu")
    engine.define(_spec().to_record(0))
    with pytest.raises(InvalidDefinition, match="learner cannot change"):
        engine.define(_spec(learner="ensemble").to_record(0))
    engine.define(_spec(budget=40, policy="greedy").to_record(0))  # these may change
    rt = engine.get(CID)
    assert rt is not None and rt.definition is not None and rt.pool is not None
    assert rt.definition.budget == 40 and rt.pool.policy.name == "greedy"


def test_readings_outside_the_plausible_range_are_rejected_never_learned() -> None:
    records, _ = _pool(10)
    engine = CampaignEngine(device="cpu")
    engine.define(_spec(min_pool_size=0).to_record(0))
    engine.register(CID, records, featurize([r["smiles"] for r in records]))
    good = {"reading_id": "ok", "compound_id": "C000", "value": 42.0, "request_id": None}
    bad = [{**good, "reading_id": "huge", "value": 1e308}, {**good, "reading_id": "neg", "compound_id": "C001",
                                                              "value": -1.0}, {**good, "reading_id": "nan", "value": math.nan}]
    errors = engine.readings(CID, "tpsa", "A^2", [good, *bad])
    assert [e.index for e in errors] == [1, 2, 3] and all(isinstance(e, InvalidEvent) for e in errors)
    assert "plausible range" in str(errors[0]) and "not finite" in str(errors[2])
    rt = engine.get(CID)
    assert rt is not None and rt.seen_readings == {"ok"}
    # Another assay without a declared range: bounded by what the learners represent stably.
    assert len(engine.readings(CID, "logd", "1", [{**good, "reading_id": "x", "value": 1e308}])) == 1
    assert engine.readings(CID, "logd", "1", [{**good, "reading_id": "y", "value": -3.5}]) == []
    update = engine.take_update(CID)
    assert update is not None and update.y_new.tolist() == [42.0]


def test_readings_of_an_unknown_campaign_make_no_state() -> None:
    engine = CampaignEngine(device="cpu")
    errors = engine.readings("ghost", "tpsa", "A^2", [{"reading_id": "g", "compound_id": "x", "value": 1.0,
                                                        "request_id": None}])
    assert len(errors) == 1 and "unknown campaign 'ghost'" in str(errors[0]) and len(engine) == 0
    with pytest.raises(InvalidEvent, match="unknown campaign"):
        engine.status({"request_id": "r", "campaign_id": "ghost", "status": "FAILED"})

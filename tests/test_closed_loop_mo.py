"""A two-assay campaign with a constraint and a slow second assay, through the real broker, Faust
worker, virtual lab (a multi-column oracle, a latency per assay) and chDB sink."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from rdkit import Chem
from rdkit.Chem import Crippen

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab
from labloop.schemas import Codec
from labloop.streams.definition import CampaignSpec, Objective
from labloop.streams.runtime import Stack

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
CID = "mo-it"
BUDGET, SLOW_S = 30, 1.5


def test_two_assays_a_constraint_and_a_slow_assay_close_the_loop(stack: Stack, codec: Codec, ch: Any,
                                                                   define_campaign: Any, settle: Any,
                                                                   tmp_path: Path) -> None:
    pool = tmp_path / "tpsa_logp.csv"  # the second assay: Crippen logP, as a virtual instrument measures it
    with open(DATA) as src, open(pool, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["smiles", "tpsa", "logp"])
        for r in csv.DictReader(src):
            mol = Chem.MolFromSmiles(r["smiles"])
            w.writerow([r["smiles"], r["tpsa"], f"{Crippen.MolLogP(mol):.4f}" if mol is not None else ""])
    spec = CampaignSpec(CID, "tpsa", "A^2", batch_size=10, init_size=10, budget=BUDGET, min_pool_size=290, seed=4,
                        request_ttl_s=600.0, objectives=(Objective("logp", "log", "AT_LEAST", 2.0),))
    oracles = Oracle.columns_from_csv(pool, "smiles", {"tpsa": "tpsa", "logp": "logp"})
    robot = RobotClient(stack.kafka_config, codec, robot_id="mo-robot", group_id="mo-robots", campaigns={CID})
    lab = VirtualLab(robot, oracles, LabConfig(unit="A^2", units={"logp": "log"}, assay_latency_s={"logp": SLOW_S})).start()
    try:
        define_campaign(stack.kafka_config, spec, pool)
        assert settle(f"SELECT count() FROM model_updates WHERE campaign_id = '{CID}' AND done", 1, 240) == 1, lab.errors
    finally:
        lab.stop()
    reqs = ch.query(f"SELECT request_id, assays, policy, batch FROM requests WHERE campaign_id = '{CID}'").result_rows
    assert len({r[0] for r in reqs}) == BUDGET and all(list(r[1]) == ["tpsa", "logp"] for r in reqs)
    assert {r[2] for r in reqs if r[3] > 0} == {"parego"}
    # Failed experiments (no logP for a compound) retire it; every other request has one reading of each assay.
    failed = {r for (r,) in ch.query(f"SELECT request_id FROM request_status WHERE campaign_id = '{CID}' "
                                     f"AND status = 'FAILED'").result_rows}
    counts = ch.query(f"SELECT assay_id, count(), uniqExact(request_id) FROM accepted_readings WHERE campaign_id = '{CID}' "
                      f"GROUP BY assay_id ORDER BY assay_id").result_rows
    assert counts == [("logp", BUDGET - len(failed), BUDGET - len(failed)), ("tpsa", BUDGET - len(failed), BUDGET - len(failed))]
    # The slow assay's results came SLOW_S after the fast one's, and the final report waited for them.
    lag = ch.query(f"SELECT min(l.t - f.t), max(l.t) FROM (SELECT request_id, min(event_time) AS t FROM readings "
                   f"WHERE campaign_id = '{CID}' AND assay_id = 'logp' GROUP BY request_id) AS l JOIN (SELECT request_id, "
                   f"min(event_time) AS t FROM readings WHERE campaign_id = '{CID}' AND assay_id = 'tpsa' "
                   f"GROUP BY request_id) AS f ON l.request_id = f.request_id").result_rows[0]
    assert lag[0] >= SLOW_S - 0.3, lag
    final = ch.query(f"SELECT event_time, n_measured FROM model_updates WHERE campaign_id = '{CID}' AND done").result_rows[0]
    assert final[0] >= lag[1] and final[1] == BUDGET - len(failed)
    # Both assays' models publish predictions, each in its own units; the final version all of the pool's.
    n_pool = ch.query(f"SELECT pool_size FROM model_updates WHERE campaign_id = '{CID}' AND done").result_rows[0][0]
    sql = (f"SELECT assay_id, count() AS n, uniqExact(model_version), max(model_version) = (SELECT max(model_version) "
           f"FROM model_updates WHERE campaign_id = '{CID}') FROM latest_predictions WHERE campaign_id = '{CID}' "
           f"GROUP BY assay_id ORDER BY assay_id")
    assert settle(f"SELECT count() FROM ({sql}) WHERE n = {n_pool}", 2, 30) == 2, ch.query(sql).result_rows
    assert [r[2:] for r in ch.query(sql).result_rows] == [(1, True), (1, True)]
    smiles = {r[0]: r[1] for r in ch.query(f"SELECT compound_id, smiles FROM compounds WHERE campaign_id = '{CID}'").result_rows}
    got = ch.query(f"SELECT compound_id, mean FROM latest_predictions WHERE campaign_id = '{CID}' AND assay_id = 'logp'").result_rows
    truth = np.array([Crippen.MolLogP(Chem.MolFromSmiles(smiles[c])) for c, _ in got])
    pred = np.array([m for _, m in got])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(pred), rank(truth))[0, 1] > 0.4  # a logP model (Spearman), in logP units
    assert abs(float(np.median(pred)) - float(np.median(truth))) < 1.0


def test_a_slow_assay_whose_results_are_all_rejected_ends_at_the_ttl(stack: Stack, codec: Codec, ch: Any,
                                                                     define_campaign: Any, settle: Any,
                                                                     tmp_path: Path) -> None:
    """The slow instrument reports in the wrong unit, so each of its readings is one dead letter.
    Each request stays in flight (the robot said COMPLETED, but a result is missing) until its TTL
    expires it; the campaign then finishes, its fast results kept, and asks for nothing more."""
    cid, ttl_s = "mo-rejected", 12.0
    pool = tmp_path / "tpsa_logp.csv"
    with open(DATA) as src, open(pool, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["smiles", "tpsa", "logp"])
        for r in csv.DictReader(src):
            mol = Chem.MolFromSmiles(r["smiles"])
            if mol is not None:
                w.writerow([r["smiles"], r["tpsa"], f"{Crippen.MolLogP(mol):.4f}"])
    spec = CampaignSpec(cid, "tpsa", "A^2", batch_size=10, init_size=10, budget=10, min_pool_size=290, seed=5,
                        request_ttl_s=ttl_s, objectives=(Objective("logp", "log", "MAXIMIZE"),))
    oracles = Oracle.columns_from_csv(pool, "smiles", {"tpsa": "tpsa", "logp": "logp"})
    robot = RobotClient(stack.kafka_config, codec, robot_id="mo-robot-2", group_id="mo-robots-2", campaigns={cid})
    lab = VirtualLab(robot, oracles, LabConfig(unit="A^2", units={"logp": "percent"},
                                               assay_latency_s={"logp": 0.5})).start()
    try:
        define_campaign(stack.kafka_config, spec, pool)
        # The robot reported all ten COMPLETED, and the fast results were accepted: still in flight, as
        # the worker sees them, in the analysts' view too.
        assert settle(f"SELECT count() FROM request_status WHERE campaign_id = '{cid}' AND status = 'COMPLETED'",
                      10, 60) == 10, lab.errors
        rejected = "SELECT sum(length(rejected_ids)) FROM dead_letters WHERE error_message LIKE '%unit ''percent''%'"
        assert settle(rejected, 10, 30) == 10  # stored after the readings they reject
        assert settle(f"SELECT count() FROM accepted_readings WHERE campaign_id = '{cid}'", 10, 30) == 10
        progress = ch.query(f"SELECT requested, in_flight, (SELECT count() FROM request_status WHERE campaign_id = "
                            f"'{cid}' AND status = 'EXPIRED') FROM campaign_progress WHERE campaign_id = '{cid}'")
        assert progress.result_rows == [(10, 10, 0)]
        assert settle(f"SELECT count() FROM model_updates WHERE campaign_id = '{cid}' AND done", 1, 240) == 1, lab.errors
    finally:
        lab.stop()
    assert ch.query(f"SELECT in_flight FROM campaign_progress WHERE campaign_id = '{cid}'").result_rows == [(0,)]
    assert ch.query(rejected).result_rows == [(10,)]  # one plate's wells, rejected once
    assert settle(f"SELECT count() FROM request_status WHERE campaign_id = '{cid}' AND status = 'EXPIRED'", 10, 60) == 10
    statuses = ch.query(f"SELECT status, robot_id, count() FROM request_status WHERE campaign_id = '{cid}' "
                        f"GROUP BY status, robot_id ORDER BY status").result_rows
    assert ("EXPIRED", "labloop-worker", 10) in statuses and ("COMPLETED", "mo-robot-2", 10) in statuses, statuses
    final = ch.query(f"SELECT n_requested, n_measured, n_pending FROM model_updates WHERE campaign_id = '{cid}' "
                     f"AND done").result_rows[0]
    assert final == (10, 10, 0)
    assert ch.query(f"SELECT count() FROM requests WHERE campaign_id = '{cid}'").result_rows[0][0] == 10
    done_at, first_request = ch.query(
        f"SELECT (SELECT max(event_time) FROM model_updates WHERE campaign_id = '{cid}' AND done), "
        f"(SELECT min(event_time) FROM requests WHERE campaign_id = '{cid}')").result_rows[0]
    assert (done_at - first_request).total_seconds() >= ttl_s  # it waited for the results until the TTL

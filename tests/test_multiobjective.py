"""Several objectives: Pareto layers, exact hypervolume, ParEGO batches, and `labloop bench mo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from labloop.models.pareto import Constraint, hypervolume, nondominated_layers, parego_batch, prob_feasible, to_min

ADME = Path(__file__).resolve().parent.parent / "data" / "adme" / "ADME_public_set_3521.csv.gz"
HLM, SOL, MDR1 = "LOG HLM_CLint (mL/min/kg)", "LOG SOLUBILITY PH 6.8 (ug/mL)", "LOG MDR1-MDCK ER (B-A/A-B)"


def test_layers_peel_the_front_off_one_at_a_time() -> None:
    Z = np.array([[1, 4], [2, 2], [4, 1], [3, 3], [5, 5], [2, 2]], dtype=float)
    assert nondominated_layers(Z).tolist() == [0, 0, 0, 1, 2, 0]


def test_hypervolume_is_exact_in_two_and_three_objectives() -> None:
    # Two points in 2-D: union of [1,3]x[2,3] and [2,3]x[1,3] = 2*1 + 1*2 - 1*1 = 3.
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([3.0, 3.0])) == pytest.approx(3.0)
    # A dominated point and one outside the reference add nothing.
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0], [2.5, 2.5], [4.0, 0.0]]), np.array([3.0, 3.0])) == pytest.approx(3.0)
    # 3-D against a Monte Carlo estimate.
    rng = np.random.default_rng(0)
    P = rng.uniform(0, 1, (12, 3))
    ref = np.ones(3)
    U = rng.uniform(0, 1, (400_000, 3))
    mc = (U[:, None, :] >= P[None, :, :]).all(axis=2).any(axis=1).mean()
    assert hypervolume(P, ref) == pytest.approx(mc, abs=0.005)
    assert to_min(np.array([[1.0, 2.0]]), [False, True]).tolist() == [[1.0, -2.0]]


def test_constraints_parse_and_feasibility_is_a_probability() -> None:
    c = Constraint.parse("HLM <= 1.0")
    assert (c.column, c.bound, c.upper) == ("HLM", 1.0, True)
    assert Constraint.parse("sol>=-2").upper is False
    with pytest.raises(ValueError):
        Constraint.parse("HLM < 1")
    p = prob_feasible(np.array([[0.0], [1.0], [2.0]]), np.array([[0.1], [1.0], [0.1]]), [c])
    assert p[0] > 0.99 and p[1] == pytest.approx(0.5) and p[2] < 0.01


def test_parego_spreads_a_batch_and_never_picks_twice() -> None:
    rng = np.random.default_rng(1)
    mean = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.9], [0.05, 0.95]])
    std = np.zeros_like(mean)
    picks = parego_batch(mean, std, np.arange(5), 3, rng)
    assert len(set(picks.tolist())) == 3 and 3 not in picks  # the dominated one comes last
    infeasible = parego_batch(mean, std, np.arange(5), 1, rng, feasible=np.array([0, 0, 1, 0, 0.0]))
    assert infeasible.tolist() == [2]


def test_bench_mo_on_adme_reports_every_key(tmp_path: Path) -> None:
    report = tmp_path / "mo.json"
    out = subprocess.run([sys.executable, "-m", "labloop.streams.cli", "bench", "mo", "--csv", str(ADME),
                          "--smiles-col", "SMILES", "--objective", f"{HLM}:min", "--objective", f"{SOL}:max",
                          "--constraint", f"{MDR1}<=0.5", "--seeds", "2", "--rounds", "2", "--report", str(report)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(report.read_text())
    assert {"hv_ratio", "top_layers_found_pct", "random", "reference", "per_round", "wall_s"} <= set(res)
    assert set(res["hv_ratio"]) == {"mean", "sd"} and 0 < res["hv_ratio"]["mean"] <= 1
    assert res["pool_size"] == 1537 and res["feasible"] < res["pool_size"]  # rows with all three columns
    assert len(res["per_round"]) == 3 and res["per_round"][-1]["n_acquired"] > res["per_round"][0]["n_acquired"]
    assert res["reference"] is None


def test_bench_mo_names_a_bad_objective(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "labloop.streams.cli", "bench", "mo", "--csv", str(ADME),
                          "--objective", "nope:sideways"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "COL:min or COL:max" in out.stderr


def test_bench_mo_names_the_rows_it_cannot_read_apart_from_gaps(tmp_path: Path) -> None:
    """A gap leaves a row out of the pool, quietly: the normal case. A value that is not a number
    (a censored ">3", an "n/a") or a SMILES RDKit cannot parse is named, with its row."""
    csv = tmp_path / "edge.csv"
    good = ["CCO", "CCN", "CCC", "CCCl", "CCBr", "c1ccccc1", "CC(=O)O", "CCOC", "CCCN", "CCCO", "c1ccncc1", "CCS"]
    rows = ["smiles,a,b"] + [f"{smi},{i},{12 - i}" for i, smi in enumerate(good)]
    rows += ["CCF,>3,1", "CCCC,1,n/a", "not a smiles,1,2", "CCI,,2"]
    csv.write_text("\n".join(rows) + "\n")
    out = subprocess.run([sys.executable, "-m", "labloop.streams.cli", "bench", "mo", "--csv", str(csv),
                          "--objective", "a:max", "--objective", "b:max", "--seeds", "1", "--rounds", "1",
                          "--init-frac", "0.2", "--batch-frac", "0.2", "--top-k", "3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "12 compounds with every column (4 rows skipped: 1 with a value missing, 3 unreadable)" in out.stdout
    named = [ln for ln in out.stderr.splitlines() if ln.startswith("skipped row")]
    assert named == ["skipped row 14: a is not a number: '>3'", "skipped row 15: b is not a number: 'n/a'",
                     "skipped row 16: RDKit could not parse the SMILES: 'not a smiles'"], out.stderr


def test_history_rows_train_the_models_but_are_never_candidates(tmp_path: Path) -> None:
    from rich.console import Console

    from labloop.streams.bench_mo import MOConfig, load_mo_csv, run_mo_bench

    csv = tmp_path / "h.csv"
    rows = ["smiles,a,b", "CCO,1,2", "CCN,2,1", "CCC,3,3", "c1ccccc1,0.5,0.5",
            "CCCl,,4", "CCBr,5,", "CCO,9,", "CCI,,", "not a smiles,1,"]  # partial, partial, a pool compound, none, bad
    csv.write_text("\n".join(rows) + "\n")
    pool = load_mo_csv(csv, "smiles", ["a", "b"], history=True)
    assert pool.smiles == ["CCO", "CCN", "CCC", "c1ccccc1"]
    assert pool.X_history.shape[0] == 2 and pool.history_counts() == {"a": 1, "b": 1}  # CCO's 9 would leak its value
    assert np.isnan(pool.history["a"][0]) and pool.history["b"][0] == 4.0
    assert load_mo_csv(csv, "smiles", ["a", "b"]).history == {}  # off by default
    # On the ADME set the history changes what is picked (the models learned from it), not the pool.
    objs = ((HLM, False), (MDR1, False), (SOL, True))
    adme = load_mo_csv(ADME, "SMILES", [HLM, MDR1, SOL], history=True)
    assert len(adme.smiles) == 1537 and adme.history_counts() == {HLM: 1550, MDR1: 1105, SOL: 636}
    quiet = Console(quiet=True)
    alone = replace(adme, X_history=adme.X_history[:0], history={})  # what load_mo_csv gives without history
    runs = [run_mo_bench(p, MOConfig(objs, rounds=1, seeds=1), quiet) for p in (alone, adme)]
    assert runs[0]["pool_size"] == runs[1]["pool_size"] == 1537
    assert runs[1]["protocol"]["history"] == adme.history_counts() and runs[0]["protocol"]["history"] is None
    assert runs[0]["per_round"][-1]["hv_ratio"] != runs[1]["per_round"][-1]["hv_ratio"]

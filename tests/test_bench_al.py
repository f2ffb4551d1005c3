"""`labloop bench al` on a pool that is not Enamine: bad rows reported, never a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labloop.streams.bench_al import ALConfig, BenchInputError, load_csv, run_bench

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TPSA pool with other column names, an empty objective and a junk one."""
    lines = DATA.read_text().splitlines()
    out = ["mol,target"] + [line.rsplit(",", 1)[0] + "," + line.rsplit(",", 1)[1] for line in lines[1:]]
    out[5] = out[5].rsplit(",", 1)[0] + ","  # no value: a failed experiment
    out[6] = out[6].rsplit(",", 1)[0] + ",n/a"
    f = tmp_path_factory.mktemp("pool") / "pool.csv"
    f.write_text("\n".join(out) + "\n")
    return f


def test_load_csv_skips_unparseable_and_keeps_failed(pool: Path) -> None:
    loaded = load_csv(pool, "mol", "target", minimize=False)
    assert len(loaded.dataset.smiles) == 300 and len(loaded.skipped) == 2
    assert [line for line, _ in loaded.skipped] == [302, 303]
    assert sum(v != v for v in loaded.dataset.values) == 2
    with pytest.raises(BenchInputError, match="no column"):
        load_csv(pool, "smiles", "target", minimize=False)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_bench_finds_more_of_the_top_than_random(pool: Path, asynchronous: bool) -> None:
    loaded = load_csv(pool, "mol", "target", minimize=False)
    cfg = ALConfig(top_k=30, init_frac=0.1, batch_frac=0.1, rounds=3, seeds=2, asynchronous=asynchronous)
    res = run_bench(loaded.dataset, cfg, loaded.X)
    rounds = res["per_round"]
    assert [r["n_acquired"] for r in rounds] == [30, 60, 90, 120]
    final = res["pct_topk_scores_found"]["mean"]
    assert final > 2 * 40.0, final  # random expectation at 40% acquired: 40% of the top-30
    if not asynchronous:
        assert rounds[0]["nll"]["mean"] is None  # the random start has no prediction to rate
    assert rounds[-1]["miscal_area"]["mean"] is not None


def test_cli_report(pool: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "labloop.streams.cli", "bench", "al", "--csv", str(pool), "--smiles-col", "mol",
                          "--objective-col", "target", "--maximize", "--top-k", "20", "--init-frac", "0.1",
                          "--batch-frac", "0.1", "--rounds", "2", "--seeds", "2", "--report", str(report)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2 row(s) with unparseable SMILES skipped" in out.stderr
    r = json.loads(report.read_text())
    assert set(r["pct_topk_scores_found"]) == {"mean", "sd"}
    assert [p["n_acquired"] for p in r["per_round"]] == [30, 60, 90]
    assert r["wall_s"] > 0

"""The shorter variant of `labloop bench faults`: kills, duplicates and poison against a ledger."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from labloop.streams.bench_faults import FaultBenchConfig, run_fault_bench
from labloop.streams.settings import Settings


def test_nothing_lost_nothing_doubled_under_kills_duplicates_and_poison(tmp_path: Path) -> None:
    cfg = FaultBenchConfig(readings=2000, rate=400, worker_kills=2, sink_kills=1, control_readings=600, quiet_s=3.0)
    res = run_fault_bench(Settings(), cfg, Console(quiet=True), workdir=tmp_path)
    assert res["readings_acked"] == 2000 and res["duplicates_resent"] == 200
    assert res["lost"] == 0
    assert res["duplicate_rows"] == 0, res["duplicate_rows_by_table"]
    assert res["dead_letters"] == res["dead_letters_from_poison"] == res["poison_injected"] == 20
    assert res["robot_executions"] == res["distinct_requests"] == 4 * cfg.budget
    assert not any(res["model_readings_mismatch"].values()), res["model_readings_mismatch"]
    assert res["kills_by_kind"] == {"worker_sigkill": 2, "sink_sigkill": 1, "sink_killed_mid_insert": 1}
    assert res["checkpoint_restores"] >= 1  # a replacement resumed from a checkpoint, not from scratch
    assert res["negative_control_detected"] and res["negative_control"]["duplicate_rows"] >= 60
    assert res["passed"]

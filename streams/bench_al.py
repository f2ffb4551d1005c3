"""``labloop bench al``: MolPAL's active-learning protocol on any pool, offline.

It drives :class:`labloop.models.PoolState` — the code the Faust agents run — without
Kafka, so seeds and settings can be compared quickly; ``--stack`` runs the same
campaign through the embedded stack as well.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from labloop.consumers.virtual_lab import open_text
from labloop.models import FeatureSpec, PoolState, TopK, calibration, parse_many, round_targets, topk_measures
from labloop.models.chem import featurize_mols
from labloop.schemas import LabloopError
from labloop.streams.datasets import Dataset
from labloop.streams.definition import DEFAULT_LEARNER, DEFAULT_POLICY

__all__ = ["ALConfig", "BenchInputError", "load_csv", "run_bench"]

MEASURES = ("pct_topk_scores_found", "pct_topk_smiles_found", "topk_avg_pct_of_true")


class BenchInputError(LabloopError):
    """The pool file cannot be used (missing columns, no numeric objective...)."""


@dataclass(frozen=True)
class ALConfig:
    """One benchmark setting (defaults: the loop's default campaign)."""

    top_k: int = 100
    init_frac: float = 0.01
    batch_frac: float = 0.01
    rounds: int = 5
    seeds: int = 5
    learner: str = DEFAULT_LEARNER
    policy: str = DEFAULT_POLICY
    device: str | None = None
    asynchronous: bool = False
    async_update_every: int = 0  # results per model update in async mode; 0 = a tenth of the batch


@dataclass
class LoadedPool:
    dataset: Dataset
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    X: np.ndarray | None = None


def load_csv(path: Path, smiles_col: str, objective_col: str, minimize: bool, unit: str = "") -> LoadedPool:
    """Read a pool: unparseable SMILES are skipped and reported; an empty or non-numeric
    objective is a failed experiment (NaN)."""
    smiles: list[str] = []
    values: list[float] = []
    lines: list[int] = []
    skipped: list[tuple[int, str]] = []
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (smiles_col, objective_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchInputError(f"{path}: no column(s) {missing}; columns are {reader.fieldnames}")
        for row in reader:
            s = (row[smiles_col] or "").strip()
            raw = (row[objective_col] or "").strip()
            try:
                v = float(raw) if raw else math.nan
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                v = math.nan
            smiles.append(s)
            values.append(v)
            lines.append(reader.line_num)
    mols, ok, errors = parse_many(smiles)
    for i, e in zip(sorted(set(range(len(smiles))) - set(ok)), errors, strict=True):
        skipped.append((lines[i], e.reason + f": {smiles[i]!r}"))
    ds = Dataset(path.name, [smiles[i] for i in ok], [values[i] for i in ok], minimize, unit)
    if not any(math.isfinite(v) for v in ds.values):
        raise BenchInputError(f"{path}: column {objective_col!r} has no numeric value")
    return LoadedPool(ds, skipped, featurize_mols(mols, FeatureSpec()))


def _featurize(ds: Dataset) -> np.ndarray:
    mols, ok, errors = parse_many(ds.smiles)
    if errors:
        raise BenchInputError(f"{len(errors)} SMILES of {ds.name} do not parse")
    return featurize_mols(mols, FeatureSpec())


def stack_targets(pool_size: int, cfg: ALConfig) -> tuple[int, int, int]:
    """``(init_size, batch_size, budget)`` of a campaign that follows the protocol with a fixed batch size."""
    targets = round_targets(pool_size, cfg.init_frac, cfg.batch_frac, cfg.rounds)
    init, budget = targets[0], targets[-1]
    return init, max(1, -(-(budget - init) // max(1, cfg.rounds))), budget


def _one_seed_rounds(X: np.ndarray, y: np.ndarray, ds: Dataset, cfg: ALConfig, seed: int,
                     top: TopK, targets: list[int] | None = None) -> list[dict[str, float]]:
    targets = targets or round_targets(len(y), cfg.init_frac, cfg.batch_frac, cfg.rounds)
    st = PoolState(X, maximize=not ds.minimize, learner=cfg.learner, policy=cfg.policy, seed=seed, device=cfg.device)
    out, acquired = [], 0
    for t in targets:
        st.retrain()
        p = st.propose(t - acquired)
        acquired = t
        v = y[p.index]
        ok = np.isfinite(v)
        st.observe(p.index[ok], v[ok])
        st.fail(p.index[~ok])
        measured = np.flatnonzero(st.status == 2)
        row = {"n_acquired": float(acquired), **topk_measures(top, y[measured], [ds.smiles[i] for i in measured])}
        row.update(calibration(v[ok], p.mean[ok], p.std[ok]))
        out.append(row)
    return out


def _one_seed_async(X: np.ndarray, y: np.ndarray, ds: Dataset, cfg: ALConfig, seed: int,
                    top: TopK) -> list[dict[str, float]]:
    """A fixed number in flight (one batch), results returning one at a time in random order."""
    n = len(y)
    targets = round_targets(n, cfg.init_frac, cfg.batch_frac, cfg.rounds)
    in_flight_cap = max(1, int(np.floor(cfg.batch_frac * n + 1e-9)))
    every = cfg.async_update_every or max(1, in_flight_cap // 10)
    budget = targets[-1]
    rng = np.random.default_rng(10_000 + seed)
    st = PoolState(X, maximize=not ds.minimize, learner=cfg.learner, policy=cfg.policy, seed=seed, device=cfg.device)
    pred: dict[int, tuple[float, float]] = {}
    flight: list[int] = []

    def request(k: int) -> None:
        p = st.propose(k)
        flight.extend(p.index.tolist())
        for i, m, s in zip(p.index.tolist(), p.mean.tolist(), p.std.tolist(), strict=True):
            pred[i] = (m, s)

    request(targets[0])
    requested, answered, since, out = targets[0], 0, 0, []
    next_t = iter(targets)
    goal = next(next_t)
    while flight:
        i = flight.pop(int(rng.integers(len(flight))))
        if np.isfinite(y[i]):
            st.observe(np.array([i]), y[i : i + 1])
        else:
            st.fail(np.array([i]))
        answered += 1
        since += 1
        if answered == goal:
            done = [j for j in pred if st.status[j] == 2]
            measured = np.flatnonzero(st.status == 2)
            row = {"n_acquired": float(answered), **topk_measures(top, y[measured], [ds.smiles[j] for j in measured])}
            row.update(calibration(y[done], np.array([pred[j][0] for j in done]), np.array([pred[j][1] for j in done])))
            out.append(row)
            goal = next(next_t, -1)
        if requested < budget and (since >= every or not flight):
            st.retrain()
            since = 0
            k = min(in_flight_cap - len(flight), budget - requested)
            if k > 0:
                request(k)
                requested += k
    return out


def run_bench(ds: Dataset, cfg: ALConfig, X: np.ndarray | None = None,
              console: Console | None = None) -> dict[str, Any]:
    """Run ``cfg.seeds`` campaigns; returns per-round mean/sd of every measure."""
    console = console or Console()
    t0 = time.perf_counter()
    if X is None:
        X = _featurize(ds)
    feat_s = time.perf_counter() - t0
    y = np.asarray(ds.values, dtype=np.float64)
    top = TopK(y, cfg.top_k, ds.minimize, ds.smiles)
    runs = []
    for seed in range(cfg.seeds):
        ts = time.perf_counter()
        fn = _one_seed_async if cfg.asynchronous else _one_seed_rounds
        runs.append(fn(X, y, ds, cfg, seed, top))
        console.print(f"  seed {seed}: {runs[-1][-1]['pct_topk_scores_found']:.1f}% of top-{cfg.top_k} scores found "
                      f"({time.perf_counter() - ts:.1f}s)")
    per_round = []
    for r in range(len(runs[0])):
        row: dict[str, Any] = {"n_acquired": int(runs[0][r]["n_acquired"])}
        for key in (*MEASURES, "nll", "miscal_area"):
            vals = np.array([run[r][key] for run in runs], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            row[key] = {"mean": round(float(vals.mean()), 3) if vals.size else None,
                        "sd": round(float(vals.std()), 3) if vals.size else None}
        per_round.append(row)
    return {"dataset": ds.name, "pool_size": len(y), "scored": int(np.isfinite(y).sum()), "top_k": cfg.top_k,
            "protocol": {"init_frac": cfg.init_frac, "batch_frac": cfg.batch_frac, "rounds": cfg.rounds,
                         "async": cfg.asynchronous},
            "learner": cfg.learner, "policy": cfg.policy, "seeds": cfg.seeds,
            "device": str(cfg.device or "auto"), "pct_topk_scores_found": per_round[-1]["pct_topk_scores_found"],
            "per_round": per_round, "featurize_s": round(feat_s, 2), "wall_s": round(time.perf_counter() - t0, 2)}


def print_bench(res: dict[str, Any], published: dict[str, list[tuple[int, float, float]]] | None,
                console: Console) -> None:
    def ms(d: dict[str, Any]) -> str:
        return "-" if d["mean"] is None else f"{d['mean']:.1f}±{d['sd']:.1f}"

    t = Table(title=f"{res['dataset']}: {res['learner']} + {res['policy']}, {res['seeds']} seed(s), "
                    f"top-{res['top_k']}{' (async)' if res['protocol']['async'] else ''}")
    cols = ["n acq", "% pool", "scores found", "smiles found", "avg % of true", "NLL", "miscal"]
    refs = [k for k in ("random", "rf greedy", "nn greedy", "mpn greedy") if published and k in published]
    for c in cols + [f"MolPAL {k}" for k in refs]:
        t.add_column(c, justify="right")
    for i, r in enumerate(res["per_round"]):
        cells = [str(r["n_acquired"]), f"{100 * r['n_acquired'] / res['pool_size']:.1f}",
                 f"[bold]{ms(r['pct_topk_scores_found'])}[/]", ms(r["pct_topk_smiles_found"]),
                 ms(r["topk_avg_pct_of_true"]),
                 "-" if r["nll"]["mean"] is None else f"{r['nll']['mean']:.2f}",
                 "-" if r["miscal_area"]["mean"] is None else f"{r['miscal_area']['mean']:.3f}"]
        for k in refs:
            rows = published[k] if published else []
            cells.append(f"{rows[i][1]:.1f}±{rows[i][2]:.1f}" if i < len(rows) else "-")
        t.add_row(*cells)
    console.print(t)
    console.print("  scores found = MolPAL's pct_topk_scores_found (tie-aware multiset overlap); NLL and miscal "
                  "(miscalibration area) rate the predicted std of each batch before it was measured")


def offline_vs_stack(settings: Any, ds: Dataset, cfg: ALConfig, X: np.ndarray | None,
                     console: Console) -> dict[str, list[float]]:
    """Seed 0 offline and through the embedded stack, with the same batch sizes; prints both."""
    from dataclasses import replace

    from labloop.streams.demo import run_on_stack

    init, batch, budget = stack_targets(len(ds.smiles), cfg)
    targets = [min(init + i * batch, budget) for i in range(cfg.rounds + 1)]
    y = np.asarray(ds.values, dtype=np.float64)
    offline = _one_seed_rounds(X if X is not None else _featurize(ds), y, ds, replace(cfg, seeds=1), 0,
                               TopK(y, cfg.top_k, ds.minimize, ds.smiles), targets)
    run = run_on_stack(settings, ds, init, batch, budget, seed=0, top_k=cfg.top_k,
                       learner=cfg.learner, policy=cfg.policy, console=console)
    t = Table("n acquired", "offline (models/)", "through the stack", title="seed 0: offline vs stack")
    for a, b in zip(offline, run["rounds"], strict=False):
        t.add_row(str(int(a["n_acquired"])), f"{a['pct_topk_scores_found']:.1f}", f"{b['pct_topk_scores_found']:.1f}")
    console.print(t)
    return {"offline_seed0": [r["pct_topk_scores_found"] for r in offline],
            "stack_seed0": [r["pct_topk_scores_found"] for r in run["rounds"]],
            "n_acquired": [r["n_acquired"] for r in run["rounds"]]}

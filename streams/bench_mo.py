"""``labloop bench mo``: the ``bench al`` protocol for several objectives and constraints, offline.

The pool is the CSV's rows with every objective and constraint column present. Each seed starts
from a random ``init_frac`` of the pool, then acquires ``batch_frac`` of it per round with one
online learner per column (labloop's default, the Tanimoto GP) and ParEGO
(:func:`labloop.models.pareto.parego_batch`). Random selection runs beside it with the same
budget, and ``--reference botorch`` adds BoTorch's qNEHVI on the same features (an optional
dependency). Measures, per round:

* ``hv_ratio``: hypervolume of the feasible acquired compounds over the whole feasible pool's,
  from a reference point that only the best ``1 - Q`` of the pool pass in each objective;
* ``top_layers_found_pct``: % of the pool's first non-dominated layers (of feasible compounds,
  as many layers as it takes to hold ``top_k``) that were acquired.

With a history (``load_mo_csv(history=True)``, ``--history``), the CSV's other rows, those that
measure some but not all of the columns, stand for a lab's earlier measurements: before the
first round every model (and the reference's) learns the values of its column there. They are
never candidates nor counted in the measures; a row whose SMILES is also in the pool is left out, so no pool value leaks in.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from labloop.consumers.virtual_lab import open_text
from labloop.models import FeatureSpec, make_learner, parse_many, round_targets
from labloop.models.chem import featurize_mols
from labloop.models.pareto import Constraint, hypervolume, nondominated_layers, parego_batch, prob_feasible, to_min
from labloop.streams.bench_al import BenchInputError

__all__ = ["GAP", "MOConfig", "MOPool", "load_mo_csv", "run_mo_bench"]


@dataclass(frozen=True)
class MOConfig:
    """One multi-objective benchmark setting."""

    objectives: tuple[tuple[str, bool], ...]  # (column, maximize)
    constraints: tuple[Constraint, ...] = ()
    ref_quantile: float = 0.5
    top_k: int = 50
    init_frac: float = 0.02
    batch_frac: float = 0.02
    rounds: int = 5
    seeds: int = 3
    learner: str = "gp"
    beta: float = 1.0
    diversity: float = 0.0
    reference: str | None = None  # "botorch"
    device: str | None = None


@dataclass
class MOPool:
    """The usable rows: SMILES, ``n x d`` features, and ``n x c`` values per column name; with
    history, ``h x d`` features of the partly measured rows and their values (NaN: not measured)."""

    smiles: list[str]
    X: np.ndarray
    values: dict[str, np.ndarray]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    X_history: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    history: dict[str, np.ndarray] = field(default_factory=dict)

    def history_counts(self) -> dict[str, int]:
        """Per column: the history rows that measure it."""
        return {c: int(np.isfinite(v).sum()) for c, v in self.history.items()}


#: The reason :func:`load_mo_csv` gives a row that lacks a value: the normal case, counted, not named.
GAP = "a value missing"


def load_mo_csv(path: Path, smiles_col: str, columns: Sequence[str], history: bool = False) -> MOPool:
    """Rows with every one of ``columns`` numeric and a SMILES RDKit parses; the rest are counted.
    ``smiles_col`` matches a column of another case when exactly one does (``SMILES``). With
    ``history``, rows with some of ``columns`` numeric (and a SMILES not in the pool) are kept
    apart as :attr:`MOPool.history`.

    Raises:
        BenchInputError: a column missing from the file, or no usable row.
    """
    smiles: list[str] = []
    rows: list[list[float]] = []
    lines: list[int] = []
    skipped: list[tuple[int, str]] = []
    partial: list[tuple[str, list[float]]] = []
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        names = reader.fieldnames or []
        if smiles_col not in names:  # "SMILES" for "smiles": the one column named so whatever its case
            same = [c for c in names if c.lower() == smiles_col.lower()]
            smiles_col = same[0] if len(same) == 1 else smiles_col
        missing = [c for c in (smiles_col, *columns) if c not in names]
        if missing:
            raise BenchInputError(f"{path}: no column(s) {missing}; columns are {reader.fieldnames}")
        for row in reader:
            vals = []
            text = None  # a value that is there but not a number ("n/a", ">3"): said apart from a gap
            for c in columns:
                raw = (row[c] or "").strip()
                try:
                    v = float(raw) if raw else math.nan
                except ValueError:
                    v, text = math.nan, text or f"{c} is not a number: {raw[:40]!r}"
                vals.append(v)
            if not all(math.isfinite(v) for v in vals):
                skipped.append((reader.line_num, text or GAP))
                if history and any(math.isfinite(v) for v in vals):
                    partial.append(((row[smiles_col] or "").strip(), vals))
                continue
            smiles.append((row[smiles_col] or "").strip())
            rows.append(vals)
            lines.append(reader.line_num)
    mols, ok, errors = parse_many(smiles)
    for i, e in zip(sorted(set(range(len(smiles))) - set(ok)), errors, strict=True):
        skipped.append((lines[i], f"{e.reason}: {smiles[i][:60]!r}"))
    if not ok:
        raise BenchInputError(f"{path}: no row has every column of {list(columns)} and a valid SMILES")
    Y = np.asarray(rows, dtype=np.float64)[ok]
    pool = MOPool([smiles[i] for i in ok], featurize_mols(mols, FeatureSpec()),
                  {c: Y[:, j] for j, c in enumerate(columns)}, skipped)
    in_pool = set(pool.smiles)
    partial = [(smi, v) for smi, v in partial if smi not in in_pool]  # the same compound would leak its value
    if partial:
        h_mols, h_ok, _ = parse_many([smi for smi, _ in partial])  # unparsable history rows are already counted
        if h_ok:
            H = np.asarray([partial[i][1] for i in h_ok], dtype=np.float64)
            pool.X_history = featurize_mols(h_mols, FeatureSpec())
            pool.history = {c: H[:, j] for j, c in enumerate(columns)}
    return pool


class _Truth:
    """What the measures compare against: the feasible pool, its reference point and top layers."""

    def __init__(self, pool: MOPool, cfg: MOConfig) -> None:
        Y = np.column_stack([pool.values[c] for c, _ in cfg.objectives])
        self.Z = to_min(Y, [m for _, m in cfg.objectives])
        self.feasible = np.ones(len(pool.smiles), dtype=bool)
        for c in cfg.constraints:
            self.feasible &= c.met(pool.values[c.column])
        if not self.feasible.any():
            raise BenchInputError("no compound of the pool meets every constraint")
        # Only the best (1 - Q) of the pool pass the reference in each objective (lower is better here).
        self.ref = np.quantile(self.Z, 1.0 - cfg.ref_quantile, axis=0)
        feas = np.flatnonzero(self.feasible)
        self.hv_pool = hypervolume(self.Z[feas], self.ref)
        layers = nondominated_layers(self.Z[feas])
        top: list[int] = []
        for k in range(int(layers.max()) + 1):
            top.extend(feas[layers == k].tolist())
            if len(top) >= cfg.top_k:
                break
        self.top = np.asarray(top)
        self.n_layers = k + 1

    def measure(self, acquired: np.ndarray) -> dict[str, float]:
        a = acquired[self.feasible[acquired]]
        hv = hypervolume(self.Z[a], self.ref) if a.size else 0.0
        return {"hv_ratio": hv / self.hv_pool if self.hv_pool > 0 else math.nan,
                "top_layers_found_pct": 100.0 * np.isin(self.top, acquired).sum() / self.top.size}


def _labloop_seed(pool: MOPool, cfg: MOConfig, truth: _Truth, seed: int, targets: list[int]) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    n = len(pool.smiles)
    cols = [c for c, _ in cfg.objectives] + [c.column for c in cfg.constraints]
    learners = {c: make_learner(cfg.learner, device=cfg.device) for c in cols}
    X = pool.X
    if pool.history:  # rows n.. of X are the history: learned once, never candidates
        X = np.vstack([pool.X, pool.X_history])
        for c in cols:
            h = np.flatnonzero(np.isfinite(pool.history[c]))
            if h.size:
                learners[c].update_from_pool(X, pool.history[c][h], (n + h).astype(np.int64))
    acquired = rng.choice(n, targets[0], replace=False)
    learned = 0
    out = [{"n_acquired": float(acquired.size), **truth.measure(acquired)}]
    for t in targets[1:]:
        new = acquired[learned:]
        for c in cols:  # online: each learner sees only the new results of its assay
            learners[c].update_from_pool(X, pool.values[c][new], new.astype(np.int64))
        learned = acquired.size
        preds = {c: learners[c].predict(pool.X) for c in cols}
        mean = to_min(np.column_stack([preds[c][0] for c, _ in cfg.objectives]), [m for _, m in cfg.objectives])
        std = np.column_stack([preds[c][1] for c, _ in cfg.objectives])
        feas = None
        if cfg.constraints:
            feas = prob_feasible(np.column_stack([preds[c.column][0] for c in cfg.constraints]),
                                 np.column_stack([preds[c.column][1] for c in cfg.constraints]), cfg.constraints)
        cand = np.setdiff1d(np.arange(n), acquired)
        picks = parego_batch(mean, std, cand, t - acquired.size, rng, feas, cfg.beta,
                             features=pool.X if cfg.diversity > 0 else None, diversity=cfg.diversity)
        acquired = np.concatenate([acquired, picks])
        out.append({"n_acquired": float(acquired.size), **truth.measure(acquired)})
    return out


def _random_seed(pool: MOPool, truth: _Truth, seed: int, targets: list[int]) -> list[dict[str, float]]:
    order = np.random.default_rng(10_000 + seed).permutation(len(pool.smiles))
    return [{"n_acquired": float(t), **truth.measure(order[:t])} for t in targets]


def _summary(runs: list[list[dict[str, float]]]) -> list[dict[str, Any]]:
    out = []
    for r in range(len(runs[0])):
        row: dict[str, Any] = {"n_acquired": int(runs[0][r]["n_acquired"])}
        for key in ("hv_ratio", "top_layers_found_pct"):
            v = np.array([run[r][key] for run in runs], dtype=np.float64)
            row[key] = {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4)}
        out.append(row)
    return out


def run_mo_bench(pool: MOPool, cfg: MOConfig, console: Console | None = None,
                 reference: Callable[..., list[dict[str, float]]] | None = None) -> dict[str, Any]:
    """Run ``cfg.seeds`` campaigns of labloop, random and (optionally) the reference; returns the report."""
    console = console or Console()
    t0 = time.perf_counter()
    truth = _Truth(pool, cfg)
    targets = round_targets(len(pool.smiles), cfg.init_frac, cfg.batch_frac, cfg.rounds)
    if targets[0] < 2 or targets[-1] > len(pool.smiles):
        raise BenchInputError(f"a pool of {len(pool.smiles)} gives acquisition targets {targets}: change the fractions")
    ours, rand, ref = [], [], []
    for seed in range(cfg.seeds):
        ts = time.perf_counter()
        ours.append(_labloop_seed(pool, cfg, truth, seed, targets))
        rand.append(_random_seed(pool, truth, seed, targets))
        if reference is not None:
            ref.append(reference(pool, cfg, truth, seed, targets))
        console.print(f"  seed {seed}: hv_ratio {ours[-1][-1]['hv_ratio']:.3f} (random {rand[-1][-1]['hv_ratio']:.3f}"
                      + (f", {cfg.reference} {ref[-1][-1]['hv_ratio']:.3f}" if ref else "")
                      + f"), top layers found {ours[-1][-1]['top_layers_found_pct']:.1f}% ({time.perf_counter() - ts:.1f}s)")
    per_round = _summary(ours)
    rand_rounds = _summary(rand)
    ref_rounds = _summary(ref) if ref else None
    for i, row in enumerate(per_round):
        row["random"] = {k: rand_rounds[i][k] for k in ("hv_ratio", "top_layers_found_pct")}
        if ref_rounds:
            row["reference"] = {k: ref_rounds[i][k] for k in ("hv_ratio", "top_layers_found_pct")}
    last = per_round[-1]
    return {"pool_size": len(pool.smiles), "skipped_rows": len(pool.skipped), "feasible": int(truth.feasible.sum()),
            "objectives": [{"column": c, "direction": "max" if m else "min"} for c, m in cfg.objectives],
            "constraints": [f"{c.column}{'<=' if c.upper else '>='}{c.bound:g}" for c in cfg.constraints],
            "reference_point": {c: float(v if not m else -v) for (c, m), v in zip(cfg.objectives, truth.ref, strict=True)},
            "ref_quantile": cfg.ref_quantile, "top_k": cfg.top_k, "top_layers": truth.n_layers,
            "top_layer_compounds": int(truth.top.size),
            "protocol": {"init_frac": cfg.init_frac, "batch_frac": cfg.batch_frac, "rounds": cfg.rounds,
                         "seeds": cfg.seeds, "learner": cfg.learner, "acquisition": "parego", "beta": cfg.beta,
                         "diversity": cfg.diversity, "history": pool.history_counts() if pool.history else None},
            "hv_ratio": last["hv_ratio"], "top_layers_found_pct": last["top_layers_found_pct"],
            "random": last["random"], "reference": ({"name": cfg.reference, **last["reference"]} if ref_rounds else None),
            "per_round": per_round, "wall_s": round(time.perf_counter() - t0, 2)}


def print_mo(res: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    def ms(d: dict[str, Any]) -> str:
        return f"{d['mean']:.3f}±{d['sd']:.3f}"

    def pct(d: dict[str, Any]) -> str:
        return f"{d['mean']:.1f}±{d['sd']:.1f}"

    objs = ", ".join(f"{o['column']} ({o['direction']})" for o in res["objectives"])
    t = Table(title=f"{objs}{'; ' + ', '.join(res['constraints']) if res['constraints'] else ''}: "
                    f"{res['pool_size']} compounds, {res['feasible']} feasible, {res['protocol']['seeds']} seed(s)")
    cols = ["n acq", "hv_ratio", "top layers %", "random hv", "random top %"]
    if res["reference"]:
        cols += [f"{res['reference']['name']} hv", f"{res['reference']['name']} top %"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in res["per_round"]:
        cells = [str(r["n_acquired"]), f"[bold]{ms(r['hv_ratio'])}[/]", pct(r["top_layers_found_pct"]),
                 ms(r["random"]["hv_ratio"]), pct(r["random"]["top_layers_found_pct"])]
        if "reference" in r:
            cells += [ms(r["reference"]["hv_ratio"]), pct(r["reference"]["top_layers_found_pct"])]
        t.add_row(*cells)
    console.print(t)
    console.print(f"  hv_ratio: hypervolume of the feasible acquired compounds / the feasible pool's, from the point "
                  f"only the best {1 - res['ref_quantile']:.0%} pass in each objective; top layers: the first "
                  f"{res['top_layers']} non-dominated layers ({res['top_layer_compounds']} compounds). {res['wall_s']:.0f}s")

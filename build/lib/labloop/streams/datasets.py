"""Bundled data: the Enamine 10k pool and its docking scores, and MolPAL's published results.

Files live in ``data/`` at the repository root (see ``data/README.md`` for
their origin and licences).
"""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DATA_DIR", "Dataset", "enamine10k", "published_results"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Dataset:
    """A pool with a ground-truth objective.

    Attributes:
        smiles: the candidate pool, in file order.
        values: objective per pool entry (NaN = no value: a failed experiment).
        minimize: True when lower is better.
        unit: unit of the values.
    """

    name: str
    smiles: list[str]
    values: list[float]
    minimize: bool
    unit: str


def enamine10k(data_dir: Path = DATA_DIR) -> Dataset:
    """MolPAL's Enamine 10k pool (10,560) with AutoDock Vina scores (kcal/mol, lower is better)."""
    with gzip.open(data_dir / "enamine10k" / "Enamine10k.csv.gz", "rt", newline="") as fh:
        smiles = [row["smiles"].strip() for row in csv.DictReader(fh)]
    with gzip.open(data_dir / "enamine10k" / "Enamine10k_scores.csv.gz", "rt", newline="") as fh:
        scores = {row["smiles"].strip(): float(row["score"]) for row in csv.DictReader(fh) if row["score"].strip()}
    return Dataset("enamine10k", smiles, [scores.get(s, math.nan) for s in smiles], True, "kcal/mol")


def published_results(measure: str = "pct_topk_scores_found", data_dir: Path = DATA_DIR) -> dict[str, list[tuple[int, float, float]]]:
    """MolPAL's per-iteration results on Enamine 10k: ``"rf greedy" -> [(n_acquired, mean, sd), ...]``.

    Only the paper's full-retraining runs and the random baseline are returned.
    """
    out: dict[str, list[tuple[int, float, float]]] = {}
    with open(data_dir / "enamine10k" / "molpal_published_results.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["measure"] != measure or row["training"] not in ("retrain", "random"):
                continue
            key = "random" if row["model"] == "random" else f"{row['model']} {row['acquisition']}"
            out.setdefault(key, []).append((int(row["n_acquired"]), float(row["mean"]), float(row["sd"])))
    for v in out.values():
        v.sort()
    return out

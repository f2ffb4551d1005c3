"""A virtual lab: a robot and an instrument that answer requests from an oracle.

The oracle maps a compound (by id or SMILES) to a value; a compound missing from
it, or a random failure, is reported as a ``FAILED`` experiment. A multi-column oracle
(one :class:`Oracle` per assay) answers requests that name several assays, each assay after
its own latency: a fast assay's readings go out before a slow one's.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from labloop.consumers.errors import BadRow
from labloop.consumers.robot import Measurement, RobotClient
from labloop.schemas.types import Record

__all__ = ["LabConfig", "Oracle", "VirtualLab", "open_text"]

log = logging.getLogger("labloop.lab")


def open_text(path: Path) -> TextIO:
    """Open a CSV for reading as text, gunzipping a ``.gz`` file."""
    return gzip.open(path, "rt", newline="") if str(path).endswith(".gz") else open(path, newline="")  # noqa: SIM115


class Oracle:
    """Ground truth: SMILES -> value (NaN where the experiment fails)."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    @classmethod
    def columns_from_csv(cls, path: Path, smiles_col: str, columns: Mapping[str, str]) -> dict[str, Oracle]:
        """One oracle per assay from one CSV: ``columns`` maps an assay id to its column."""
        return {assay: cls.from_csv(path, smiles_col, col) for assay, col in columns.items()}

    @classmethod
    def from_csv(cls, path: Path, smiles_col: str = "smiles", value_col: str = "score") -> Oracle:
        """Read a CSV (optionally gzipped); an empty value cell means a failed experiment."""
        values: dict[str, float] = {}
        with open_text(path) as fh:
            reader = csv.DictReader(fh)
            for col in (smiles_col, value_col):
                if col not in (reader.fieldnames or []):
                    raise BadRow(1, f"{path} has no column {col!r} (columns: {reader.fieldnames})")
            for row in reader:
                raw = (row[value_col] or "").strip()
                values[row[smiles_col].strip()] = float(raw) if raw else math.nan
        return cls(values)

    def __call__(self, smiles: str) -> float:
        return self.values.get(smiles, math.nan)


@dataclass(frozen=True)
class LabConfig:
    """How the virtual lab behaves.

    Attributes:
        latency_s: seconds from accepting a batch to publishing its results.
        noise_sd: Gaussian noise added to oracle values (objective units).
        failure_rate: probability an experiment fails at random.
        plate_size: results per ``PlateReadout``; 0 publishes single ``AssayReading`` events.
        unit, instrument_id: stamped on readings.
        units: an assay's unit where it is not ``unit``.
        assay_latency_s: seconds an assay takes after ``latency_s`` (default 0).
    """

    latency_s: float = 0.0
    noise_sd: float = 0.0
    failure_rate: float = 0.0
    plate_size: int = 384
    unit: str = "kcal/mol"
    instrument_id: str = "virtual-reader-1"
    seed: int = 0
    units: Mapping[str, str] = field(default_factory=dict)
    assay_latency_s: Mapping[str, float] = field(default_factory=dict)


class VirtualLab:
    """Run a :class:`RobotClient` against an :class:`Oracle` (or one per assay) until stopped."""

    def __init__(self, robot: RobotClient, oracle: Oracle | Mapping[str, Oracle], config: LabConfig = LabConfig()) -> None:
        self.robot, self.config = robot, config
        self.oracles: Mapping[str, Oracle] | None = oracle if isinstance(oracle, Mapping) else None
        self.oracle: Oracle | None = None if isinstance(oracle, Mapping) else oracle
        self.rng = np.random.default_rng(config.seed)
        self.failed = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def readings_published(self) -> int:
        return self.robot.readings_published

    def handle(self, requests: list[Record]) -> None:
        """Accept, run and report one batch of requests."""
        if not requests:
            return
        for r in requests:
            self.robot.report(r, "ACCEPTED")
        for r in requests:
            self.robot.report(r, "STARTED")
        t0 = time.monotonic()
        cfg = self.config
        groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
        done: list[Record] = []
        for r in requests:
            # Every assay the request names is measured, or the whole experiment fails (known
            # before any result goes out: an assay the oracle has no value for fails it).
            values = {a: self._value(a, r["smiles"]) for a in (r.get("assays") or [r["assay_id"]])}
            if any(math.isnan(v) for v in values.values()) or self.rng.random() < cfg.failure_rate:
                self.failed += 1
                self.robot.report(r, "FAILED", "no result from the instrument")
                continue
            for a, value in values.items():
                if cfg.noise_sd:
                    value += float(self.rng.normal(0.0, cfg.noise_sd))
                groups[(r["campaign_id"], a)].append(Measurement(r, value, assay_id=a))
            done.append(r)
        # Each assay's results after its latency, the fastest first.
        for (_, assay), results in sorted(groups.items(), key=lambda g: cfg.assay_latency_s.get(g[0][1], 0.0)):
            wait = t0 + cfg.latency_s + cfg.assay_latency_s.get(assay, 0.0) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            unit = cfg.units.get(assay, cfg.unit)
            if cfg.plate_size:
                for s in range(0, len(results), cfg.plate_size):
                    self.robot.publish_plate(results[s : s + cfg.plate_size], unit, cfg.instrument_id)
            else:
                for m in results:
                    self.robot.publish_reading(m, unit, cfg.instrument_id)
            # No flush here: the producer sends in the background, and a flush would block while
            # the broker is away, before the statuses below are journaled.
        if not groups and cfg.latency_s:
            time.sleep(max(0.0, t0 + cfg.latency_s - time.monotonic()))
        for r in done:
            self.robot.report(r, "COMPLETED")
        self.robot.flush()

    def _value(self, assay: str, smiles: str) -> float:
        if self.oracles is not None:
            o = self.oracles.get(assay)
            return o(smiles) if o is not None else math.nan
        assert self.oracle is not None
        return self.oracle(smiles)

    def run(self) -> None:
        """Serve requests until :meth:`stop`: first the ones a previous run of this robot took on
        and never finished (from its journal), then new ones."""
        try:
            self.handle(self.robot.unfinished())
            self.robot.flush()  # results a previous run journaled and the broker never acknowledged
        except Exception as exc:
            log.exception("virtual lab failed")
            self.errors.append(exc)
            return
        while not self._stop.is_set():
            try:
                self.handle(self.robot.poll(0.3))
            except Exception as exc:  # surfaced to the owner through .errors, not swallowed
                log.exception("virtual lab failed")
                self.errors.append(exc)
                return

    def start(self) -> VirtualLab:
        self._thread = threading.Thread(target=self.run, name="virtual-lab", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.robot.close()

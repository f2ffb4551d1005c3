"""A virtual lab: a robot and an instrument that answer requests from an oracle.

The oracle maps a compound (by id or SMILES) to a value; a compound missing from
it, or a random failure, is reported as a ``FAILED`` experiment.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
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
    """

    latency_s: float = 0.0
    noise_sd: float = 0.0
    failure_rate: float = 0.0
    plate_size: int = 384
    unit: str = "kcal/mol"
    instrument_id: str = "virtual-reader-1"
    seed: int = 0


class VirtualLab:
    """Run a :class:`RobotClient` against an :class:`Oracle` until stopped."""

    def __init__(self, robot: RobotClient, oracle: Oracle, config: LabConfig = LabConfig()) -> None:
        self.robot, self.oracle, self.config = robot, oracle, config
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
        if self.config.latency_s:
            time.sleep(self.config.latency_s)
        groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
        for r in requests:
            value = self.oracle(r["smiles"])
            if math.isnan(value) or self.rng.random() < self.config.failure_rate:
                self.failed += 1
                self.robot.report(r, "FAILED", "no result from the instrument")
                continue
            if self.config.noise_sd:
                value += float(self.rng.normal(0.0, self.config.noise_sd))
            groups[(r["campaign_id"], r["assay_id"])].append(Measurement(r, value))
        for results in groups.values():
            if self.config.plate_size:
                for s in range(0, len(results), self.config.plate_size):
                    self.robot.publish_plate(results[s : s + self.config.plate_size], self.config.unit,
                                             self.config.instrument_id)
            else:
                for m in results:
                    self.robot.publish_reading(m, self.config.unit, self.config.instrument_id)
            for m in results:
                self.robot.report(m.request, "COMPLETED")
        self.robot.flush()

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

"""One campaign's live state and the events it emits, without Kafka.

The Faust agents feed decoded records in and send what comes out; keeping the
logic here makes it testable and keeps the agents thin.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labloop.models import PoolState
from labloop.models.learners import pack_rows, unpack_rows
from labloop.models.loop import AVAILABLE, FAILED, MEASURED, PENDING, Proposal
from labloop.models.multi import SideModel
from labloop.models.pareto import Constraint, parego_batch, prob_feasible, to_min
from labloop.models.quality import LiveScore
from labloop.models.state import pack_strings, unpack_strings
from labloop.schemas import Codec, InvalidEvent
from labloop.schemas.codec import avro_string
from labloop.schemas.types import Record
from labloop.streams.definition import CampaignSpec

__all__ = ["CampaignRuntime", "check_plate", "check_times", "plate_error", "Emit", "PREDICTION_CHUNK", "PredictionWriter", "Raw",
           "Update", "now_ms", "unknown_campaign"]

_SEEN_CHUNKS = 64  # seen_readings chunks before a checkpoint packs them into one again
STATE_FORMAT = 2  # of CampaignRuntime.state_dict; 1 was a pickle, which is never loaded
PREDICTION_CHUNK = 2000  # items per Prediction message: ~60 kB, well under broker limits


def now_ms() -> int:
    return int(time.time() * 1000)


def _opt(v: float) -> float | None:
    """NaN (no model yet) travels as Avro null."""
    return None if math.isnan(v) else float(v)




@dataclass(frozen=True)
class Emit:
    """An event to publish: topic role, record name, record (keyed by ``campaign_id``)."""

    role: str
    name: str
    record: Record


@dataclass(frozen=True)
class Raw:
    """An event already encoded (off the event loop): topic role and bytes (keyed by ``campaign_id``)."""

    role: str
    value: bytes


class PredictionWriter:
    """Encodes a campaign's Prediction events with NumPy, publishing only what moved.

    A Prediction item is a compound id and two doubles. The writer keeps every pool row's
    encoded id once, and the ``(mean, std)`` it last published for each row. :meth:`encode`
    publishes the rows never published and those whose mean or std moved by more than
    ``tolerance`` times the row's new std since they were last published; the others' published
    values are still that close to the model's. So the newest published prediction of every
    compound (ClickHouse's ``latest_predictions``) stays within ``tolerance`` sd of the current
    model at every version, at a fraction of the bytes: with the default 0.05 a 10,000-compound
    pool learning ~40 noisy readings per fit republished 16 % of its rows per version over versions
    50-150 and 7 % over 150-300 (measured here, docs/benchmarks.md). The bytes read back exactly like
    :meth:`Codec.encode`'s (tests/test_codec.py). Used from one thread at a time per campaign.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._ids = np.zeros(0, dtype=np.uint8)  # every row's encoded id, back to back
        self._off = np.zeros(0, dtype=np.int64)  # where row i's id begins in _ids
        self._len = np.zeros(0, dtype=np.int64)
        self._mean = np.zeros(0)  # what was last published per row (NaN: never)
        self._std = np.zeros(0)
        self._version = np.zeros(0, dtype=np.int64)  # the model version each row was last published at
        self.last_rows = 0  # rows the last encode() published

    def _grow(self, ids: list[str]) -> None:
        """Take in rows appended to the pool since the last call (rows never change id)."""
        if len(ids) == self._len.shape[0]:
            return
        pre = [avro_string(c) for c in ids[self._len.shape[0]:]]
        lens = np.array([len(b) for b in pre], dtype=np.int64)
        self._off = np.concatenate([self._off, self._ids.shape[0] + np.cumsum(lens) - lens])
        self._len = np.concatenate([self._len, lens])
        self._ids = np.concatenate([self._ids, np.frombuffer(b"".join(pre), dtype=np.uint8)])
        self._mean = np.concatenate([self._mean, np.full(len(pre), np.nan)])
        self._std = np.concatenate([self._std, np.full(len(pre), np.nan)])
        self._version = np.concatenate([self._version, np.full(len(pre), -1, dtype=np.int64)])

    def encode(self, campaign_id: str, assay_id: str, version: int, ids: list[str], mean: np.ndarray,
               std: np.ndarray, t: int, tolerance: float, complete: bool = False) -> list[bytes]:
        """Prediction messages (``PREDICTION_CHUNK`` items each, in row order) for the rows of
        ``mean``/``std`` (length ``len(ids)``, objective units) that moved by more than
        ``tolerance`` x std since they were last published, and those never published. A version
        that moved nothing still gets one message, with no items: every version is announced.
        ``tolerance=0`` publishes every row whose value changed at all; ``complete`` every row not
        yet published at ``version`` (a final version's whole pool, without repeating rows)."""
        self._grow(ids)
        n = int(mean.shape[0])
        pm, ps = self._mean[:n], self._std[:n]
        with np.errstate(invalid="ignore"):
            bound = tolerance * np.abs(std)
            moved = ~(np.abs(mean - pm) <= bound) | ~(np.abs(std - ps) <= bound)  # NaN (never sent) counts as moved
        if complete:
            moved |= self._version[:n] != version
        sel = np.flatnonzero(moved)
        self.last_rows = int(sel.shape[0])
        pm[sel], ps[sel] = mean[sel], std[sel]
        self._version[sel] = version
        head = {"campaign_id": campaign_id, "model_version": version, "assay_id": assay_id, "event_time": t,
                "items": None}
        out = []
        for s in range(0, max(1, sel.shape[0]), PREDICTION_CHUNK):
            rows = sel[s:s + PREDICTION_CHUNK]
            lens = self._len[rows]
            total = int(lens.sum())
            starts = np.cumsum(lens + 16) - (lens + 16)  # where each item begins in the message's array
            buf = np.empty(total + 16 * rows.shape[0], dtype=np.uint8)
            within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)  # byte k of its id
            buf[np.repeat(starts, lens) + within] = self._ids[np.repeat(self._off[rows], lens) + within]
            vals = np.empty((rows.shape[0], 2), dtype="<f8")
            vals[:, 0], vals[:, 1] = mean[rows], std[rows]
            buf[((starts + lens)[:, None] + np.arange(16)[None, :]).ravel()] = vals.view(np.uint8).ravel()
            out.append(self.codec.encode_with_items("Prediction", head, buf.tobytes(), int(rows.shape[0])))
        return out


@dataclass(frozen=True)
class Update:
    """A model update in flight: the new observations (oriented values and pool positions), the
    pool snapshot, readings applied so far; for a multi-objective campaign also each further
    assay's new ``(values, positions)`` and, once fitted, its ``(mean, std)`` over the pool."""

    y_new: np.ndarray
    keys: np.ndarray
    X_pool: np.ndarray
    n_readings: int
    offsets: dict[str, int]
    side: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    side_pred: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # filled by the fit


# A request's statuses while its results may still come: the TTL expires it from any of them.
_LIVE = ("REQUESTED", "ACCEPTED", "STARTED")


@dataclass
class _Request:
    index: int
    sequence: int
    expires_at: int  # 0 while PROPOSED: a proposal waits for its decision, however long
    status: str = "REQUESTED"  # PROPOSED and REJECTED only in approval-gated campaigns
    priority: int = 0


# The decisions a person can take on a proposed request (Decision.action).
APPROVE, REJECT, PRIORITIZE = "APPROVE", "REJECT", "PRIORITIZE"


# Timestamps an input may carry (ms since the epoch): from the epoch (tests and imports of old
# data use it) to a day ahead of this clock (clock skew); ±2^63 was stored as years 0 and 9999.
_FUTURE_MS = 86_400_000


def check_times(record: Record, now: int) -> None:
    """Raise :class:`InvalidEvent` unless the record's ``event_time`` and ``ingest_time`` (where it
    has them) lie between the epoch and a day after ``now`` (ms)."""
    for name in ("event_time", "ingest_time"):
        t = record.get(name)
        if t is not None and not 0 <= t <= now + _FUTURE_MS:
            raise InvalidEvent(f"{name} {t} is outside the plausible window [0, now + 1 day] (ms since the epoch)")


def check_plate(plate: Record, max_wells: int) -> None:
    """Raise :class:`InvalidEvent` for a plate with more than ``max_wells`` wells."""
    if len(plate["wells"]) > max_wells:
        raise InvalidEvent(f"plate {plate['plate_id']!r} has {len(plate['wells']):,} wells, more than the {max_wells:,} "
                           f"allowed")


def plate_error(plate: Record, errors: list[InvalidEvent]) -> InvalidEvent:
    """One error for a plate's rejected wells, naming them (a dead letter per well would carry the
    whole plate each time: its size grows as the square of the plate's)."""
    wells = plate["wells"]
    if len(errors) == 1 and errors[0].index is None:  # about the whole plate (an unknown campaign, say)
        return errors[0]
    shown = "; ".join(str(e) for e in errors[:20]) + (f"; and {len(errors) - 20} more" if len(errors) > 20 else "")
    return InvalidEvent(f"plate {plate['plate_id']!r}: {len(errors)} of {len(wells)} well(s) rejected: {shown}")


def unknown_campaign(campaign_id: str, readings: list[Record]) -> InvalidEvent:
    """The error for readings (records with ``reading_id``) of a campaign not defined here."""
    ids = ", ".join(r["reading_id"] for r in readings[:3]) + (" ..." if len(readings) > 3 else "")
    return InvalidEvent(f"{len(readings)} reading(s) ({ids}) for unknown campaign {campaign_id!r}")


@dataclass
class CampaignRuntime:
    """Pool, model, requests and seen readings of one campaign.

    Not thread-safe: the caller serializes access (one asyncio lock per campaign).
    """

    campaign_id: str
    device: str | None = None
    definition: CampaignSpec | None = None
    pool: PoolState | None = None
    compound_ids: list[str] = field(default_factory=list)
    smiles: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    requests: dict[str, _Request] = field(default_factory=dict)
    seen_readings: set[str] = field(default_factory=set)
    n_requested: int = 0  # requests that count against the budget (an expired one gives its place back)
    n_issued: int = 0  # every request ever made: the sequence behind request ids, never reused
    n_batches: int = 0
    n_readings: int = 0  # distinct readings applied, all assays
    # "topic:partition" -> next offset processed: the audit trail of what each model learned from
    applied_offsets: dict[str, int] = field(default_factory=dict)
    model_offsets: dict[int, dict[str, int]] = field(default_factory=dict)
    done_announced: bool = False
    live: LiveScore = field(default_factory=LiveScore)  # prospective accuracy of the objective's model
    # request id -> its ExperimentRequest, of requests PROPOSED and awaiting a decision
    proposals: dict[str, Record] = field(default_factory=dict)
    side: dict[str, SideModel] = field(default_factory=dict)  # the further objectives' and constraints' models
    _staged: list[np.ndarray] = field(default_factory=list)
    # Checkpoints store seen_readings incrementally: ids applied since the last snapshot, and the
    # packed chunks of those before (a snapshot then costs the new ids, not all of them).
    _seen_new: list[str] = field(default_factory=list, repr=False)
    _seen_chunks: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    _seen_packed: int = 0

    def state_dict(self, learner: bool = True) -> dict[str, Any]:
        """The campaign as arrays and JSON values (see :mod:`labloop.models.state`), for a checkpoint.

        ``seen_readings`` goes as chunks: only the ids applied since the last snapshot are packed
        anew (all of them again if the set was changed directly, or once per ``_SEEN_CHUNKS``
        snapshots, so the chunks stay few). ``learner=False`` leaves the learner's state out for
        the caller to add under ``["pool"]["learner"]`` (it lives in the model process).
        Call with the campaign's lock held: arrays that change in place are copied.
        """
        if len(self.seen_readings) != self._seen_packed + len(self._seen_new) or len(self._seen_chunks) >= _SEEN_CHUNKS:
            self._seen_chunks, self._seen_packed, self._seen_new = [], 0, list(self.seen_readings)
        if self._seen_new:
            self._seen_chunks.append(pack_strings(self._seen_new))
            self._seen_packed += len(self._seen_new)
            self._seen_new = []
        reqs = list(self.requests.items())
        d = self.definition
        return {
            "format": STATE_FORMAT, "campaign_id": self.campaign_id,
            "definition": None if d is None else {k: v for k, v in d.to_record(0).items() if k != "event_time"},
            "pool": None if self.pool is None else self.pool.state_dict(learner=learner),
            "compound_ids": pack_strings(self.compound_ids), "smiles": pack_strings(self.smiles),
            "requests": {"ids": pack_strings([k for k, _ in reqs]),
                         "index": np.array([r.index for _, r in reqs], dtype=np.int64),
                         "sequence": np.array([r.sequence for _, r in reqs], dtype=np.int64),
                         "expires_at": np.array([r.expires_at for _, r in reqs], dtype=np.int64),
                         "status": pack_strings([r.status for _, r in reqs]),
                         "priority": np.array([r.priority for _, r in reqs], dtype=np.int64)},
            "proposals": {k: dict(v) for k, v in self.proposals.items()},
            "side": {a: m.state_dict() for a, m in self.side.items()},
            "seen": list(self._seen_chunks), "n_requested": self.n_requested, "n_issued": self.n_issued,
            "n_batches": self.n_batches, "n_readings": self.n_readings, "applied_offsets": dict(self.applied_offsets),
            "model_offsets": {str(v): dict(o) for v, o in self.model_offsets.items()},
            "done_announced": self.done_announced, "live": self.live.state_dict(),
            "staged": pack_rows(np.concatenate(self._staged)) if self._staged else None}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | None = None) -> CampaignRuntime:
        """Rebuild a campaign from :meth:`state_dict` (its learner is refitted from its stored data).

        Raises:
            InvalidEvent: the state is of another format, or its definition does not validate.
        """
        if state.get("format") != STATE_FORMAT:
            raise InvalidEvent(f"campaign state format {state.get('format')!r}, expected {STATE_FORMAT}")
        rt = cls(str(state["campaign_id"]), device=device)
        if state["definition"] is not None:
            rt.definition = CampaignSpec.from_record({**state["definition"], "event_time": 0})
        if state["pool"] is not None:
            rt.pool = PoolState.from_state(state["pool"], device=device)
        rt.compound_ids, rt.smiles = unpack_strings(state["compound_ids"]), unpack_strings(state["smiles"])
        rt.index = {c: i for i, c in enumerate(rt.compound_ids)}
        q = state["requests"]
        prio = q["priority"].tolist() if "priority" in q else [0] * len(q["index"])  # absent before approval existed
        rt.requests = {rid: _Request(int(i), int(seq), int(exp), st, int(p)) for rid, i, seq, exp, st, p in zip(
            unpack_strings(q["ids"]), q["index"].tolist(), q["sequence"].tolist(), q["expires_at"].tolist(),
            unpack_strings(q["status"]), prio, strict=True)}
        rt.proposals = {str(k): dict(v) for k, v in (state.get("proposals") or {}).items()}
        if rt.pool is not None:
            rt.side = {str(a): SideModel.from_state(st, rt.pool.X, device) for a, st in (state.get("side") or {}).items()}
        rt._seen_chunks = list(state["seen"])
        rt.seen_readings = {rid for chunk in rt._seen_chunks for rid in unpack_strings(chunk)}
        rt._seen_packed = len(rt.seen_readings)
        rt.n_requested, rt.n_issued = int(state["n_requested"]), int(state["n_issued"])
        rt.n_batches, rt.n_readings = int(state["n_batches"]), int(state["n_readings"])
        rt.applied_offsets = {str(k): int(v) for k, v in state["applied_offsets"].items()}
        rt.model_offsets = {int(v): {str(k): int(o) for k, o in offs.items()} for v, offs in state["model_offsets"].items()}
        rt.done_announced = bool(state["done_announced"])
        rt.live = LiveScore.from_state(state.get("live"))  # absent in checkpoints written before it existed
        rt._staged = [unpack_rows(state["staged"])] if state["staged"] is not None else []
        return rt

    # ---- inputs -------------------------------------------------------------------------
    def define(self, record: Record) -> None:
        """Apply a ``Campaign`` event. Validated first: an invalid definition, or one that changes
        what a running campaign is built on (:data:`~labloop.streams.definition.FIXED`), raises
        :class:`~labloop.streams.definition.InvalidDefinition` and changes nothing."""
        spec = CampaignSpec.from_record(record)
        if self.definition is not None:
            self.definition.check_change(spec)
            if self.pool is not None and spec.policy != self.definition.policy:
                self.pool.set_policy(spec.policy)
            self.definition = spec
            return
        X = np.concatenate(self._staged) if self._staged else np.zeros((0, 0), dtype=np.float32)
        self.pool = PoolState(X, maximize=spec.maximize, learner=spec.learner, policy=spec.policy, seed=spec.seed,
                              device=self.device)
        # Further assays' learners live in this process (the first objective's in the model process).
        self.side = {o.assay_id: SideModel(spec.learner, self.pool.size, self.device) for o in spec.objectives}
        self._staged = []
        self.definition = spec

    def add_compounds(self, records: list[Record], X: np.ndarray, packed: dict[str, Any] | None = None) -> int:
        """Add featurized compounds (row ``i`` of ``X`` for ``records[i]``); returns how many were new.
        ``packed``: ``X`` packed for checkpoints (used when every row is new)."""
        keep = [i for i, r in enumerate(records) if r["compound_id"] not in self.index]
        fresh: dict[str, int] = {}
        rows = []
        for i in keep:
            cid = records[i]["compound_id"]
            if cid in fresh:
                continue
            fresh[cid] = len(self.compound_ids)
            self.compound_ids.append(cid)
            self.smiles.append(records[i]["smiles"])
            rows.append(i)
        if not rows:
            return 0
        self.index.update(fresh)
        Xn = X[rows]
        if self.pool is not None:
            self.pool.add(Xn, packed if len(rows) == X.shape[0] else None)
            for m in self.side.values():
                m.grow(self.pool.size)
        else:
            self._staged.append(Xn)
        return len(rows)

    def apply_readings(self, assay_id: str, unit: str, readings: list[Record]) -> list[InvalidEvent]:
        """Validate and apply readings of one assay and unit (a plate's wells, or single readings).

        Each record needs ``reading_id``, ``compound_id``, ``value`` and ``request_id``. A
        reading already applied (same ``reading_id``) changes nothing. Returns one error per
        rejected reading (its ``index`` in ``readings``), or one for all of them when the
        campaign is unknown (``index`` None); the others are applied.
        """
        if self.definition is None or self.pool is None:
            return [unknown_campaign(self.campaign_id, readings)]
        d = self.definition
        objective = assay_id == d.objective_assay_id
        side = self.side.get(assay_id)
        expected = d.unit_of(assay_id)
        if expected is not None and unit != expected:
            return [InvalidEvent(f"reading {r['reading_id']}: unit {unit!r}, campaign expects {expected!r} for "
                                 f"assay {assay_id!r}", k) for k, r in enumerate(readings)]
        low, high = d.range_of(assay_id)
        index, seen, requests, new_ids = self.index, self.seen_readings, self.requests, self._seen_new
        errors: list[InvalidEvent] = []
        idx: list[int] = []
        vals: list[float] = []
        touched: list[_Request] = []
        for k, r in enumerate(readings):
            rid = r["reading_id"]
            if rid in seen:
                continue
            ci = index.get(r["compound_id"])
            if ci is None:
                errors.append(InvalidEvent(
                    f"reading {rid}: compound {r['compound_id']!r} is not in campaign {self.campaign_id!r}", k))
                continue
            v = r["value"]
            if not low <= v <= high:  # NaN fails both
                why = "is not finite" if not math.isfinite(v) else \
                    f"is outside the plausible range [{low:g}, {high:g}] of assay {assay_id!r}"
                errors.append(InvalidEvent(f"reading {rid}: value {v} {why}", k))
                continue
            req = r["request_id"]
            if req is not None:
                rq = requests.get(req)
                if rq is None:
                    errors.append(InvalidEvent(f"reading {rid}: request {req!r} does not exist", k))
                    continue
                touched.append(rq)
            seen.add(rid)
            new_ids.append(rid)
            self.n_readings += 1
            if objective or side is not None:
                idx.append(ci)
                vals.append(v)
        if idx and side is not None:
            side.observe(np.array(idx), np.array(vals, dtype=np.float64))
        elif idx:
            at, y = np.array(idx), np.array(vals, dtype=np.float64)
            pred = self.pool.current_prediction()
            if pred is not None:  # scored by the model in force, before it learns them
                self.live.add(pred[0][at], pred[1][at], y, self.pool.model_version)
            self.pool.observe(at, y)
        for rq in touched:  # completed once every assay it names has a result: a slow one may be still to come
            if self._results_complete(rq.index):
                rq.status = "COMPLETED"
        return errors

    def _results_complete(self, index: int) -> bool:
        """Whether pool row ``index`` has a result of every assay the campaign's requests name."""
        assert self.pool is not None
        return bool(self.pool.status[index] == MEASURED) and all(math.isfinite(m.values[index]) for m in self.side.values())

    def restore_request(self, r: Record, proposed: bool = False) -> bool:
        """Re-adopt an ExperimentRequest published before a restart (``proposed``: on the proposals
        topic): pending again, its id and sequence never reused. A request known as proposed and
        found on the requests topic was approved. Returns False when it is unknown here or already
        known."""
        if self.pool is None or r["compound_id"] not in self.index:
            return False
        known = self.requests.get(r["request_id"])
        if known is not None:
            if not proposed and known.status in ("PROPOSED", "REQUESTED"):  # approved: published to the robots
                if known.status == "PROPOSED":
                    known.status = "REQUESTED"
                    self.proposals.pop(r["request_id"], None)
                known.expires_at = int(r["expires_at"])
            return False
        i = self.index[r["compound_id"]]
        self.requests[r["request_id"]] = _Request(i, int(r["sequence"]), 0 if proposed else int(r["expires_at"]),
                                                  "PROPOSED" if proposed else "REQUESTED", int(r["priority"]))
        if proposed:
            self.proposals[r["request_id"]] = dict(r)
        self.pool.mark_pending(np.array([i]))
        self.n_issued = max(self.n_issued, int(r["sequence"]) + 1)
        self.n_batches = max(self.n_batches, int(r["batch"]) + 1)
        self.n_requested += 1
        return True

    def continue_after(self, model_version: int, done: bool) -> None:
        """A ModelUpdate this campaign published before a restart: the next version is after it, and
        a final report already sent is not sent again."""
        if self.pool is not None:
            self.pool.model_version = max(self.pool.model_version, model_version)
            self.done_announced = self.done_announced or done

    def on_status(self, r: Record) -> None:
        """Apply a robot's status report (FAILED retires the compound, EXPIRED re-queues it)."""
        req = self.requests.get(r["request_id"])
        if req is None:
            raise InvalidEvent(f"status {r['status']} for unknown request {r['request_id']!r}")
        if req.status in ("PROPOSED", "REJECTED"):
            raise InvalidEvent(f"status {r['status']} for request {r['request_id']!r}, which is {req.status.lower()} "
                               f"and was never sent to a robot")
        if req.status in ("COMPLETED", "FAILED", "EXPIRED"):
            return
        if r["status"] == "COMPLETED" and self.pool is not None and not self._results_complete(req.index):
            # The robot is done, but a result is not here yet: it may be on its way (readings and
            # statuses are separate topics), or dead-lettered. The request stays live, so that its
            # results complete it or its TTL expires it; never in flight for ever.
            return
        req.status = r["status"]
        if self.pool is None or self.pool.status[req.index] != PENDING:
            return
        if r["status"] == "FAILED":
            self.pool.fail(np.array([req.index]))
        elif r["status"] == "EXPIRED":
            self.pool.release(np.array([req.index]))
            self.n_requested -= 1  # an expired request gives its budget back

    def expire(self, now: int) -> list[Emit]:
        """Expire pending requests past their ``expires_at``."""
        out = []
        for rid, req in self.requests.items():
            if req.status in _LIVE and req.expires_at <= now:
                rec = {"request_id": rid, "campaign_id": self.campaign_id, "compound_id": self.compound_ids[req.index],
                       "status": "EXPIRED", "robot_id": "labloop-worker", "reason": "request_ttl_s elapsed", "event_time": now}
                self.on_status(rec)
                out.append(Emit("status", "RequestStatus", rec))
        return out

    # ---- decisions ----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return 0 if self.pool is None else self.pool.count(PENDING)

    def wanted(self) -> int:
        """How many requests to issue now (0 = wait)."""
        d, pool = self.definition, self.pool
        if d is None or pool is None or pool.size < d.min_pool_size or pool.size == 0:
            return 0
        left = d.budget - self.n_requested
        if left <= 0:
            return 0
        if d.schedule == "ROUNDS":
            if self.pending:
                return 0
            k = d.init_size if self.n_batches == 0 else d.batch_size
        else:
            k = (d.init_size if self.n_batches == 0 else d.batch_size) - self.pending
        return max(0, min(k, left))

    def take_update(self) -> Update | None:
        """Snapshot what the next model update needs (call with the campaign's lock held)."""
        if self.pool is None:
            return None
        work = self.pool.take_new()
        if work is None and self.pool.learner.n_seen == 0:
            return None  # further assays learn once the first objective has a model: it scores the pool
        side = {a: w for a, m in self.side.items() if (w := m.take_new()) is not None}
        if work is None and not side:
            return None
        if work is None:  # only further assays learned something
            work = (np.zeros(0), np.zeros(0, dtype=np.int64), self.pool.X)
        return Update(work[0], work[1], work[2], self.n_readings, dict(self.applied_offsets), side)

    def commit_update(self, update: Update, pred: tuple[np.ndarray, np.ndarray], train_s: float,
                      device: str) -> list[Emit]:
        """Install a finished fit as version ``pool.model_version + 1`` and describe it (ModelUpdate;
        the caller publishes its Predictions, encoded by :class:`PredictionWriter`)."""
        assert self.pool is not None
        self.pool.commit(pred)
        for a, p in update.side_pred.items():
            self.side[a].pred = p if p[0].shape[0] == self.pool.size else None
        self.model_offsets[self.pool.model_version] = update.offsets
        return self.model_events(train_s, int(update.keys.shape[0]), device, n_readings=update.n_readings)

    def processed(self, topic: str, partition: int, offset: int) -> None:
        """Record that a reading-carrying message was processed (in partition order)."""
        key = f"{topic}:{partition}"
        if offset + 1 > self.applied_offsets.get(key, 0):
            self.applied_offsets[key] = offset + 1

    def requests_now(self, device: str) -> list[Emit]:
        """Requests the campaign wants now, or its final report once the budget is spent."""
        if self.pool is None or self.definition is None:
            return []
        k = self.wanted()
        if k > 0:
            return self.propose(k)
        if not self.done_announced and self.definition.budget <= self.n_requested and self.pending == 0 \
                and self.sides_complete():  # a slow assay's results still to come: the final report waits
            return self.model_events(0.0, 0, device, n_readings=self.n_readings)
        return []

    def model_events(self, train_s: float, n_new: int, device: str, n_readings: int = 0) -> list[Emit]:
        """The ModelUpdate of the current model version.

        When the campaign finishes without new data (its last requests failed),
        the final ModelUpdate repeats the last version with ``done`` set: the
        idempotency key of ModelUpdate is (campaign, version, done).
        """
        assert self.pool is not None and self.definition is not None
        pool, t = self.pool, now_ms()
        measured = pool.values[pool.status == MEASURED]
        best = None
        if measured.size:
            best = float(measured.max() if self.definition.maximize else measured.min())
        # Done once the budget is spent, nothing is in flight, and the model has learned every reading: a
        # fit that started before the last readings arrived is not the final model.
        done = self.n_requested >= self.definition.budget and pool.count(PENDING) == 0 and pool.unlearned == 0 \
            and self.sides_complete()
        out = [Emit("model_updates", "ModelUpdate", {
            "campaign_id": self.campaign_id, "model_version": pool.model_version, "learner": self.definition.learner,
            "device": device, "n_train": pool.learner.n_seen, "n_new": n_new, "n_measured": int(measured.size),
            "n_failed": pool.count(FAILED), "n_pending": pool.count(PENDING), "n_requested": self.n_requested,
            "pool_size": pool.size, "best_value": best, "train_s": train_s, "done": done,
            "n_readings": n_readings, "trained_on": self.model_offsets.get(pool.model_version, {}),
            **{f"live_{k}": v for k, v in self.live.summary().items()}, "event_time": t})]
        if done:
            self.done_announced = True
        return out

    def sides_complete(self) -> bool:
        """Whether the further assays have nothing more to come: each has learned every reading it
        got, and no live request whose first objective was measured still waits for one (a slow
        assay). A request that failed or expired waits for nothing, nor does a compound measured
        without a request (from history): a gap is normal, not a result still to come."""
        if not self.side or self.pool is None:
            return True
        if any(m.unlearned for m in self.side.values()):
            return False
        status = self.pool.status
        return not any(rq.status in _LIVE and status[rq.index] == MEASURED and not self._results_complete(rq.index)
                       for rq in self.requests.values())

    def _propose_multi(self, k: int) -> Proposal:
        """ParEGO over every objective's model, weighted by the probability of meeting the
        constraints (the default of ``labloop bench mo``); an assay with no reading yet plays no part."""
        assert self.pool is not None and self.definition is not None
        d, pool = self.definition, self.pool
        mean0, std0 = pool.predict_pool()
        n = pool.size
        means, stds, maxs, weights = [mean0], [std0], [d.maximize], [1.0]
        cm, cs, cons = [], [], []
        for o in d.objectives:
            p = self.side[o.assay_id].prediction(pool.X)
            if o.is_constraint:
                if p is not None:
                    assert o.bound is not None
                    cm.append(p[0])
                    cs.append(p[1])
                    cons.append(Constraint(o.assay_id, o.bound, o.goal == "AT_MOST"))
                continue
            m, s = p if p is not None else (np.zeros(n), np.ones(n))
            means.append(m)
            stds.append(s)
            maxs.append(o.goal == "MAXIMIZE")
            weights.append(o.weight)
        feas = prob_feasible(np.column_stack(cm), np.column_stack(cs), cons) if cons else None
        cand = np.flatnonzero(pool.status == AVAILABLE)
        scores: list[float] = []
        rng = np.random.default_rng([d.seed, self.n_batches])  # reproducible per batch, also after a restore
        idx = parego_batch(to_min(np.column_stack(means), maxs), np.column_stack(stds), cand, k, rng, feas,
                           weights=np.asarray(weights), scores=scores)
        pool.mark_pending(idx)
        return Proposal(idx, mean0[idx], std0[idx], np.asarray(scores), pool.model_version)

    def propose(self, k: int) -> list[Emit]:
        """Choose ``k`` compounds and build their ExperimentRequests."""
        assert self.pool is not None and self.definition is not None
        d, t = self.definition, now_ms()
        prop = self._propose_multi(k) if self.side and self.pool.learner.n_seen > 0 else self.pool.propose(k)
        policy = ("parego" if self.side else d.policy) if prop.model_version else "random"
        out = []
        for prio, i in enumerate(prop.index.tolist()):
            seq = self.n_issued
            rid = f"{self.campaign_id}-r{seq:07d}"
            expires = t + int(d.request_ttl_s * 1000)
            self.requests[rid] = _Request(i, seq, 0, "PROPOSED", prio) if d.approval else _Request(i, seq, expires)
            self.n_requested += 1
            self.n_issued += 1
            out.append(Emit("proposals" if d.approval else "requests", "ExperimentRequest", {
                "request_id": rid, "campaign_id": self.campaign_id, "compound_id": self.compound_ids[i],
                "smiles": self.smiles[i], "assay_id": d.objective_assay_id, "assays": d.assays if d.objectives else [],
                "priority": prio, "sequence": seq, "batch": self.n_batches, "policy": policy,
                "acquisition_score": _opt(prop.score[prio]), "predicted_mean": _opt(prop.mean[prio]),
                "predicted_std": _opt(prop.std[prio]),
                "model_version": prop.model_version, "trained_on": self.model_offsets.get(prop.model_version, {}),
                "event_time": t, "expires_at": expires}))
            if d.approval:
                self.proposals[rid] = out[-1].record
        if out:
            self.n_batches += 1
        return out

    def decide_on(self, r: Record, now: int) -> list[Emit]:
        """Apply a person's ``Decision`` on a proposed request (``now``: ms since the epoch).

        APPROVE sends it to the robots (its TTL starts now); REJECT retires the compound from
        this campaign for good and gives the request's place in the budget back; PRIORITIZE
        sets its priority. The same decision applied twice (at-least-once delivery) changes
        nothing the second time.

        Raises:
            InvalidEvent: an unknown request, a reject without a reason, a negative priority, or
                a decision contradicting one already taken (rejecting an approved request).
        """
        rid, action = r["request_id"], r["action"]
        req = self.requests.get(rid)
        if req is None:
            raise InvalidEvent(f"decision {r['decision_id']!r}: request {rid!r} is not one of campaign "
                               f"{self.campaign_id!r}'s")
        if r["priority"] is not None and not 0 <= r["priority"] <= 1_000_000:
            raise InvalidEvent(f"decision {r['decision_id']!r}: priority {r['priority']} is outside [0, 1000000]")
        if action == REJECT and not (r["reason"] or "").strip():
            raise InvalidEvent(f"decision {r['decision_id']!r}: a rejection needs a reason")
        if req.status != "PROPOSED":
            if action == (REJECT if req.status == "REJECTED" else APPROVE):
                return []  # already applied
            raise InvalidEvent(f"decision {r['decision_id']!r}: {action} request {rid!r}, which is already "
                               f"{req.status.lower()}")
        if r["priority"] is not None:
            req.priority = int(r["priority"])
            self.proposals[rid] = {**self.proposals[rid], "priority": req.priority}
        if action == PRIORITIZE:
            return []
        proposal = self.proposals.pop(rid)
        assert self.pool is not None and self.definition is not None
        if action == REJECT:
            req.status = "REJECTED"
            self.pool.fail(np.array([req.index]))  # never proposed again in this campaign
            self.n_requested -= 1  # its place in the budget goes to another compound
            return []
        req.status = "REQUESTED"
        req.expires_at = now + int(self.definition.request_ttl_s * 1000)
        return [Emit("requests", "ExperimentRequest", {**proposal, "priority": req.priority, "event_time": now,
                                                       "expires_at": req.expires_at})]

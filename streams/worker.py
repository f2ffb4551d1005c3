"""The Faust application: agents that turn readings into models and requests.

Topology (every input keyed and co-partitioned by ``campaign_id``)::

    campaigns ─┐
    compounds ─┤                           ┌─> predictions
    readings  ─┼─> CampaignRuntime (per id) ┼─> requests
    plates    ─┤   micro-batched updates    ├─> model-updates
    status    ─┘                           └─> dead-letters (anything that fails)

Agents consume in micro-batches (``take_events``), decode Avro themselves
(values are raw bytes), featurize on a thread, and fit in a child process
(:mod:`labloop.streams.modelhost`; a thread with ``LABLOOP_MODEL_PROCESS=false``), so the
event loop keeps heart-beating and fits never wait on its interpreter lock. Delivery is at-least-once: every
handler is idempotent (compounds by id, readings by ``reading_id``, statuses by
request state).

Every ``checkpoint_interval_s`` the worker snapshots each campaign (under its lock,
with no fit in flight and nothing decided but unsent), flushes the producer, and
writes the checkpoint with the offsets below which every input was handled
(:mod:`labloop.streams.checkpoint`); a replacement resumes from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import numpy as np
from faust.exceptions import ConsumerNotStarted

from labloop.models import FeatureSpec, ModelError
from labloop.models.chem import MoleculeLimits
from labloop.models.learners import pack_rows
from labloop.models.state import dumps
from labloop.schemas import TOPICS, InvalidEvent, LabloopError
from labloop.schemas.types import Record
from labloop.streams.campaign import (
    CampaignRuntime,
    Emit,
    PredictionWriter,
    Raw,
    Update,
    check_plate,
    check_times,
    now_ms,
    plate_error,
)
from labloop.streams.checkpoint import CheckpointStore
from labloop.streams.chempool import ChemPool
from labloop.streams.engine import CampaignEngine
from labloop.streams.faust_transport import set_fetch_max_wait
from labloop.streams.metrics import WorkerMetrics
from labloop.streams.modelhost import ModelHost, ModelHostError, RemoteLearner
from labloop.streams.progress import Progress
from labloop.streams.settings import Settings

__all__ = ["LabloopWorker", "create_app"]

log = logging.getLogger("labloop.worker")
SERVICE = "labloop-worker"
IDLE_AFTER_S = 5.0  # seconds without any input before the long-poll takes kafka_fetch_max_wait_idle_ms
# A dead letter keeps its message's bytes whole up to 256 KiB (a 1,536-well plate is ~80 KB), else
# their first 64 KiB: a 1 MB message's dead letter did not fit aiokafka's produce request.
_DEAD_LETTER_RAW_MAX, _DEAD_LETTER_RAW_KEPT = 262_144, 65_536
_DEAD_LETTER_IDS_MAX = 20_000  # rejected ids listed in one dead letter (a plate within the message cap has fewer)


def _credentials(settings: Settings) -> Any:
    """Faust's credentials from the settings: SASL (PLAIN, SCRAM, OAUTHBEARER), TLS, mutual TLS."""
    sec = settings.kafka_security()
    ctx = None
    if sec.protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=str(sec.cafile) if sec.cafile else None)
        if sec.certfile:
            ctx.load_cert_chain(str(sec.certfile), str(sec.keyfile) if sec.keyfile else None, sec.key_password)
    if sec.protocol.startswith("SASL") and sec.mechanism == "OAUTHBEARER":
        from labloop.streams.oauth import ClientCredentialsTokens

        return faust.OAuthCredentials(oauth_cb=ClientCredentialsTokens.from_settings(settings), ssl_context=ctx)
    if sec.protocol.startswith("SASL"):
        return faust.SASLCredentials(username=sec.username or "", password=sec.password or "",
                                     mechanism=sec.mechanism or "PLAIN", ssl_context=ctx)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


class LabloopWorker:
    """Campaign state and handlers; :func:`create_app` wires them to Faust agents."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.codec = settings.codec()
        self.spec = FeatureSpec()
        self.limits = MoleculeLimits(settings.max_smiles_chars, settings.max_heavy_atoms)
        self.engine = CampaignEngine(device=settings.torch_device)  # the one writer of campaign state
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # One thread each: torch already uses every core for a fit, and RDKit's batch API its own threads.
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-model")
        self.chem_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-chem")  # checkpoints, packing
        self.chem = ChemPool(self.limits, self.spec, settings.chem_timeout_s)
        self.models: ModelHost | None = None  # started by start_models(); None = fits on the model thread
        self.updaters: dict[str, asyncio.Task[None]] = {}
        self.prediction_writers: dict[tuple[str, str], PredictionWriter] = {}  # per campaign and assay
        self.sending: dict[str, asyncio.Future[None]] = {}  # per campaign: the last batch of events handed to send
        # Checkpoints: a campaign is "busy" from deciding something (a fit, requests, expiries) until
        # it is sent, and a paused campaign starts nothing new, so its snapshot never holds a
        # half-applied fit or an unsent request. Offsets, floors and timing: self.progress.
        self.checkpoints: CheckpointStore | None = None
        self.progress = Progress(settings.checkpoint_interval_s, settings.backlog_messages)
        self.busy: dict[str, int] = defaultdict(int)
        self.paused: set[str] = set()
        self._fetch_wait_ms = settings.kafka_fetch_max_wait_ms  # the consumer starts with it
        self._input_at = time.monotonic()  # when an input batch last arrived (the idle long-poll)
        self.topics = {role: app.topic(t.name, key_type=bytes, value_type=bytes, partitions=t.partitions)
                       for role, t in TOPICS.items()}
        self.metrics = WorkerMetrics()
        self.health: Any = None  # the HealthServer, when the worker command started one
        self.checkpoint_at: float | None = None  # time.time() when the checkpoint last covered every change
        self.readiness: tuple[bool, str] = (False, "starting")  # set on the event loop, read by /readyz

    def ready(self) -> tuple[bool, str]:
        """For ``/readyz``: restored, consuming, and its timer running (see :meth:`on_timer`)."""
        return self.readiness

    @property
    def lag(self) -> dict[tuple[str, int], int]:
        """Per reading-carrying input partition: messages behind its high watermark (see :class:`Progress`)."""
        return self.progress.lag

    # ---- the model process ----------------------------------------------------------------
    def start_models(self, threads: int) -> None:
        """Start the model process (it imports torch meanwhile: start it early)."""
        self.models = ModelHost(threads)

    def adopt_all(self) -> None:
        """Move every defined campaign's learner into the model process (after a restore, the
        checkpointed learners move in); call before consuming."""
        for cid in self.engine:
            self._adopt(cid)

    def _adopt(self, campaign_id: str) -> None:
        models = self.models
        if models is not None:
            self.engine.place_learner(campaign_id, lambda learner: learner if isinstance(learner, RemoteLearner)
                                      else models.adopt(campaign_id, learner))

    def _exit_if_models_died(self, exc: BaseException) -> None:
        """Without its model process a worker can neither fit nor checkpoint: exit (code 70) so that
        a replacement restores the campaigns from the last checkpoint and Kafka."""
        if self.models is not None and not self.models.alive():
            log.critical("%s; exiting so that a replacement restores the campaigns", exc)
            os._exit(70)

    def stop_models(self) -> None:
        self.chem.close()
        if self.models is not None:
            self.models.close()

    # ---- output ---------------------------------------------------------------------------
    async def emit(self, campaign_id: str, events: Iterable[Emit | Raw], acked: bool = False) -> None:
        """Send ``events`` keyed by campaign; with ``acked``, return only once the broker has
        acknowledged the last of each topic (a partition keeps their order)."""
        last: dict[str, Any] = {}
        for e in events:
            value = e.value if isinstance(e, Raw) else self.codec.encode(e.name, e.record)
            last[e.role] = await self.topics[e.role].send(key=campaign_id.encode(), value=value)
        if acked and last:
            await asyncio.gather(*last.values())

    async def dead_letter(self, event: Any, stage: str, exc: BaseException, rejected_ids: Iterable[str] = ()) -> None:
        """One DeadLetter for ``event``'s message; ``rejected_ids``: the records of it that were
        refused (reading ids), so that analysts' ``accepted_readings`` leaves them out."""
        msg = event.message
        log.warning("dead letter from %s[%s]@%s (%s): %s", msg.topic, msg.partition, msg.offset, stage, exc)
        raw = msg.value if isinstance(msg.value, bytes) else b""
        note = ""
        if len(raw) > _DEAD_LETTER_RAW_MAX:  # a dead letter must fit a produce request, and not be what floods the topic
            note = f" [raw: the first {_DEAD_LETTER_RAW_KEPT:,} of {len(raw):,} bytes]"
            raw = raw[:_DEAD_LETTER_RAW_KEPT]
        self.metrics.dead_letters.labels(type(exc).__name__, stage).inc()
        rec = {"source_topic": msg.topic, "source_partition": msg.partition, "source_offset": msg.offset,
               "source_key": msg.key if isinstance(msg.key, bytes | None) else str(msg.key).encode(),
               "stage": stage, "service": SERVICE, "error_class": type(exc).__name__,
               "error_message": str(exc)[:2000] + note, "raw": raw, "rejected_ids": list(rejected_ids),
               "event_time": now_ms()}
        await self.topics["dead_letters"].send(key=msg.topic.encode(), value=self.codec.encode("DeadLetter", rec))

    def decode(self, ev: Any, expect: tuple[str, ...], now: int) -> Record:
        """A message's record, checked for size before decoding and for plausible timestamps after.

        Raises:
            LabloopError: a named error for the dead letter.
        """
        value = ev.value
        if isinstance(value, bytes | bytearray) and len(value) > self.settings.max_message_bytes:
            raise InvalidEvent(f"message of {len(value):,} bytes, more than the {self.settings.max_message_bytes:,} "
                               f"allowed (LABLOOP_MAX_MESSAGE_BYTES)")
        record = self.codec.decode(value, expect=expect).record
        check_times(record, now)
        return record

    async def decoded(self, events: list[Any], expect: tuple[str, ...]) -> AsyncIterator[tuple[Any, Record]]:
        now = now_ms()
        for ev in events:
            try:
                yield ev, self.decode(ev, expect, now)
            except LabloopError as exc:
                await self.dead_letter(ev, "decode", exc)

    # ---- the decision step ----------------------------------------------------------------
    def tick(self, campaign_id: str) -> None:
        """Make sure the campaign's updater runs: it folds in new data, then requests what the campaign wants.

        One updater per campaign at a time; data that arrives while it fits is taken by its
        next pass, so a backlog costs one update per fit, not one per micro-batch.
        """
        self.progress.touch(campaign_id)
        task = self.updaters.get(campaign_id)
        if task is None or task.done():
            self.updaters[campaign_id] = asyncio.ensure_future(self._updater(campaign_id))

    def _fit_and_encode(self, rt: CampaignRuntime, update: Update, version: int) -> tuple[
            tuple[np.ndarray, np.ndarray], list[bytes], int]:
        """On the model thread: update the learners, score the pool, and encode the Prediction
        events of the first objective and of each further assay that learned. Returns the first
        objective's ``(mean, std)``, the messages, and how many rows they carry."""
        assert rt.definition is not None
        pred = self.engine.fit(rt.campaign_id, update)
        raws, rows = self._encode(rt, [(rt.definition.objective_assay_id, pred), *update.side_pred.items()], version,
                                  self.settings.prediction_tolerance)
        return pred, raws, rows

    def _encode(self, rt: CampaignRuntime, preds: list[tuple[str, tuple[np.ndarray, np.ndarray] | None]], version: int,
                tolerance: float, complete: bool = False) -> tuple[list[bytes], int]:
        """The Prediction messages of ``preds`` (assay id, ``(mean, std)`` over the pool or None),
        each assay through its own :class:`PredictionWriter`, and how many rows they carry."""
        raws: list[bytes] = []
        rows, t = 0, now_ms()
        for assay, pred in preds:
            if pred is None:
                continue
            writer = self.prediction_writers.setdefault((rt.campaign_id, assay), PredictionWriter(self.codec))
            raws += writer.encode(rt.campaign_id, assay, version, rt.compound_ids, pred[0], pred[1], t, tolerance,
                                  complete=complete)
            rows += writer.last_rows
        return raws, rows

    def _final_predictions(self, rt: CampaignRuntime, events: list[Emit]) -> list[Raw]:
        """When ``events`` report the campaign done: the final model's predictions of every row not
        yet published at its version, so that a finished campaign's newest predictions are all its
        final model's (between versions they are within ``prediction_tolerance`` sd of them)."""
        if rt.pool is None or rt.definition is None or not any(
                e.role == "model_updates" and e.record["done"] for e in events):
            return []
        preds = [(rt.definition.objective_assay_id, rt.pool.current_prediction()),
                 *((a, m.pred) for a, m in rt.side.items())]  # a further assay's, as of its last fit
        raws, rows = self._encode(rt, preds, rt.pool.model_version, 0.0, complete=True)
        self.metrics.predictions.inc(rows)
        return [Raw("predictions", r) for r in raws]

    def _send_in_order(self, campaign_id: str, events: list[Emit | Raw]) -> None:
        """Send a campaign's events after those handed over before them, without waiting here (the
        next fit starts meanwhile); the campaign stays busy, for checkpoints, until they are sent."""
        prev = self.sending.get(campaign_id)

        async def run() -> None:
            try:
                if prev is not None:
                    await asyncio.wait([prev])
                await self.emit(campaign_id, events, acked=True)
            except Exception:  # never silently: the events are lost for this run, the log says which
                log.exception("sending %d event(s) of campaign %s failed", len(events), campaign_id)
            finally:
                self.busy[campaign_id] -= 1

        self.sending[campaign_id] = asyncio.ensure_future(run())

    async def _updater(self, campaign_id: str) -> None:
        engine = self.engine
        lock = self.locks[campaign_id]
        loop = asyncio.get_running_loop()
        try:
            while True:
                while campaign_id in self.paused:
                    await asyncio.sleep(0.01)
                async with lock:
                    if campaign_id in self.paused:
                        continue
                    rt = engine.get(campaign_id)
                    if rt is None or rt.pool is None or rt.definition is None:
                        return
                    device = str(getattr(rt.pool.learner, "device", "cpu"))
                    update = engine.take_update(campaign_id)
                    version = rt.pool.model_version + 1  # only this updater commits versions
                    self.busy[campaign_id] += 1
                    if update is None:
                        try:
                            out = engine.decide(campaign_id, device)
                        except BaseException:  # never leave the campaign busy: checkpoints would wait forever
                            self.busy[campaign_id] -= 1
                            raise
                        if out:
                            self.progress.touch(campaign_id)
                        break
                try:
                    t0 = time.perf_counter()
                    pred, raws, n_rows = await loop.run_in_executor(self.model_pool, self._fit_and_encode, rt, update,
                                                                    version)
                    self.metrics.fit.observe(time.perf_counter() - t0)
                    self.metrics.predictions.inc(n_rows)
                    async with lock:
                        events = engine.commit_update(campaign_id, update, pred, time.perf_counter() - t0, device)
                        assert rt.pool.model_version == version
                        self.progress.touch(campaign_id)
                except BaseException:
                    self.busy[campaign_id] -= 1
                    raise
                prev = self.sending.get(campaign_id)
                self._send_in_order(campaign_id, [*events, *(Raw("predictions", r) for r in raws),
                                                  *self._final_predictions(rt, events)])
                # Back-pressure: the next fit waits until the version before this one is sent. When the
                # broker takes a version's predictions slower than the model makes them (a durable log
                # on a busy machine), fits coalesce more readings instead of queueing versions in memory.
                if prev is not None and not prev.done():
                    await asyncio.wait([prev])
                # A backlog: coalesce more of it into the next fit, and leave the cores to draining it.
                until = time.perf_counter() + self._pace(time.perf_counter() - t0)
                while time.perf_counter() < until and self.behind():
                    await asyncio.sleep(min(0.02, until - time.perf_counter()))
            self._send_in_order(campaign_id, [*out, *self._final_predictions(rt, out)])
        except ModelHostError as exc:
            self._exit_if_models_died(exc)
            log.exception("model update of campaign %s failed", campaign_id)
        except Exception:  # an updater must never die silently: log with the campaign, let the next tick retry
            log.exception("model update or request step of campaign %s failed", campaign_id)

    def behind(self) -> bool:
        """Whether a readings input is more than ``backlog_messages`` behind its high watermark."""
        return self.progress.behind()

    def _pace(self, fit_s: float) -> float:
        """Seconds to wait before the next fit (while :meth:`behind`), so that fits take at most
        ``backlog_fit_share`` of the time a backlog drains: one model update per several
        micro-batches, the cores left to the drain, and the wait ends with the backlog."""
        share = self.settings.backlog_fit_share
        return 0.0 if share >= 1.0 or not self.behind() else fit_s * (1.0 / share - 1.0)

    def observe_lag(self, spans: dict[Any, tuple[int, int]]) -> None:
        """After a batch of readings or plates (``spans``: see :func:`_spans`): how far each of
        its partitions is behind."""
        for tp, (_, last) in spans.items():
            try:
                hw = self.app.consumer.highwater(tp)
            except (AssertionError, ConsumerNotStarted) as exc:  # not assigned (a rebalance), not started
                log.debug("no high watermark for %s: %r", tp, exc)
                continue
            if hw is not None and hw >= 0:  # None until a fetch for it was answered
                self.progress.observed(tp.topic, tp.partition, hw - last - 1)

    def saw_input(self) -> None:
        """After any input batch: the long-poll leaves its idle setting for the next fetch."""
        self._input_at = time.monotonic()
        self.apply_fetch_wait()

    def apply_fetch_wait(self) -> None:
        """Give the consumer's next fetch the long-poll :meth:`fetch_wait_ms` asks for, if it changed."""
        wait = self.fetch_wait_ms()
        if wait != self._fetch_wait_ms and set_fetch_max_wait(self.app, wait):
            log.debug("fetch long-poll now %d ms", wait)
            self._fetch_wait_ms = wait

    def fetch_wait_ms(self) -> int:
        """The consumer's long-poll for the state :meth:`behind` reports: short when live (Tansu
        holds every fetch for the whole wait, so it is the latency of an input after a quiet
        moment), long under a backlog, which drained single readings about a fifth faster (README,
        "How the worker keeps up"), and long again after ``IDLE_AFTER_S`` with no input at all: 20 ms
        fetches kept an idle worker at 22 % of a core and its broker at 30 %; at 200 ms, 11 % and
        24 % (``kafka_fetch_max_wait_idle_ms``; the first input after the quiet then waits up to
        that long once)."""
        s = self.settings
        if self.behind():
            return s.kafka_fetch_max_wait_backlog_ms
        if time.monotonic() - self._input_at > IDLE_AFTER_S:
            return s.kafka_fetch_max_wait_idle_ms
        return s.kafka_fetch_max_wait_ms

    # ---- checkpoints ----------------------------------------------------------------------
    async def _snapshot(self, campaign_id: str) -> bytes:
        """The campaign's state as checkpoint bytes (:func:`labloop.models.state.dumps`), taken
        with no fit in flight and nothing decided but unsent."""
        loop = asyncio.get_running_loop()
        self.paused.add(campaign_id)
        t0 = time.perf_counter()
        try:
            while True:
                while self.busy[campaign_id]:
                    await asyncio.sleep(0.005)
                async with self.locks[campaign_id]:
                    if self.busy[campaign_id]:
                        continue
                    # Read with the lock held (handlers wait for this campaign only): copies and packed
                    # strings, so the encoding below can run on a thread while the campaign moves on.
                    self.progress.snapshotted(campaign_id)
                    t1 = time.perf_counter()
                    rt = self.engine.get(campaign_id)
                    assert rt is not None
                    learner = rt.pool.learner if rt.pool is not None else None
                    remote = learner if isinstance(learner, RemoteLearner) else None
                    # The model process's learner state is asked for now, before any later fit, and collected after.
                    pending = remote.request_state() if remote is not None else None
                    state = self.engine.state_dict(campaign_id, learner=remote is None)
                    t2 = time.perf_counter()
                    break
        finally:
            self.paused.discard(campaign_id)
        if pending is not None:
            state["pool"]["learner"] = await asyncio.wrap_future(pending)
        blob = await loop.run_in_executor(self.chem_pool, dumps, state)
        log.debug("snapshot of %s: waited %.0f ms for its fit, held its lock %.0f ms, %.1f MB in %.0f ms", campaign_id,
                  (t1 - t0) * 1000, (t2 - t1) * 1000, len(blob) / 1e6, (time.perf_counter() - t1) * 1000)
        return blob

    async def checkpoint(self) -> None:
        """Snapshot every campaign, make sure what they decided is in Kafka, then write the file."""
        store, progress = self.checkpoints, self.progress
        if store is None or not progress.due() or not len(self.engine):
            return
        t0 = time.perf_counter()
        floors = progress.begin()  # taken first: every later snapshot holds at least this much
        # A campaign unchanged since its last snapshot keeps its file: only active campaigns are stored again.
        cids = list(self.engine)
        try:
            blobs = {cid: await self._snapshot(cid) for cid in cids if cid in progress.changed or not store.has(cid)}
        except ModelHostError as exc:
            self._exit_if_models_died(exc)
            raise
        t1 = time.perf_counter()
        await self.app.producer.flush()
        t2 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self.chem_pool, store.write, floors, blobs, cids)
        t3 = time.perf_counter()
        self.checkpoint_at = time.time()
        log.info("checkpoint %d: %d of %d campaign(s), %.1f MB in %.0f ms (snapshots %.0f, flush %.0f, write %.0f)",
                 store.written, len(blobs), len(cids), store.last_bytes / 1e6, (t3 - t0) * 1000, (t1 - t0) * 1000,
                 (t2 - t1) * 1000, (t3 - t2) * 1000)

    # ---- handlers -------------------------------------------------------------------------
    async def guarded(self, handler: Any, batch: list[Any], role: str) -> None:
        """Run a handler on a micro-batch so that no exception ends the agent or costs the events beside it.

        Handlers dead-letter the errors they expect. Anything else is a defect, but one message
        must not take a campaign down with it: the batch is handled again one message at a time
        (every handler is idempotent), and each message that still fails is dead-lettered with
        its error, stage ``handler``.
        """
        try:
            await handler(batch)
            return
        except Exception:
            log.exception("%s handler failed on a batch of %d; retrying its messages one by one", role, len(batch))
        for ev in batch:
            try:
                await handler([ev])
            except Exception as exc:
                try:
                    await self.dead_letter(ev, "handler", exc)
                except Exception:  # not even a dead letter could be sent: say so, and go on with the next
                    m = ev.message
                    log.exception("no dead letter for %s[%s]@%s either", m.topic, m.partition, m.offset)

    async def on_campaigns(self, events: list[Any]) -> None:
        touched = set()
        async for ev, r in self.decoded(events, ("Campaign",)):
            cid = r["campaign_id"]
            try:
                async with self.locks[cid]:
                    self.engine.define(r)
                    self._adopt(cid)
                touched.add(cid)
                log.info("campaign %s defined", cid)
            except (LabloopError, ModelError) as exc:
                await self.dead_letter(ev, "validate", exc)
        for cid in touched:
            self.tick(cid)

    async def on_compounds(self, events: list[Any]) -> None:
        batch: dict[str, list[tuple[Any, Record]]] = defaultdict(list)
        async for ev, r in self.decoded(events, ("CompoundRegistered",)):
            batch[r["campaign_id"]].append((ev, r))
        loop = asyncio.get_running_loop()
        for cid, items in batch.items():
            smiles = [r["smiles"] for _, r in items]
            # In a child process, bounded in time: RDKit's parser holds the interpreter lock.
            ok, errors, X = await self.chem.featurize(smiles)
            bad = set(range(len(items))) - set(ok)
            for pos, err in zip(sorted(bad), errors, strict=True):
                await self.dead_letter(items[pos][0], "validate", err)
            packed = await loop.run_in_executor(self.chem_pool, pack_rows, X)  # for checkpoints, off the loop
            async with self.locks[cid]:
                self.engine.register(cid, [items[i][1] for i in ok], X, packed)
            self.tick(cid)

    async def on_readings(self, events: list[Any]) -> None:
        """Single readings: decoded in one loop, applied per campaign, assay and unit in one call."""
        by_campaign: dict[str, list[tuple[Any, Record]]] = defaultdict(list)
        decode, now, expect = self.decode, now_ms(), ("AssayReading",)
        for ev in events:
            try:
                r = decode(ev, expect, now)
            except LabloopError as exc:
                await self.dead_letter(ev, "decode", exc)
                continue
            by_campaign[r["campaign_id"]].append((ev, r))
        engine = self.engine
        for cid, items in by_campaign.items():
            rejected: list[tuple[Any, Record, LabloopError]] = []
            async with self.locks[cid]:
                if not engine.defined(cid):  # one dead letter per message, as each names its campaign
                    rejected = [(ev, r, e) for ev, r in items for e in engine.readings(cid, r["assay_id"], r["unit"], [r])]
                else:
                    groups: dict[tuple[str, str], list[tuple[Any, Record]]] = defaultdict(list)
                    for ev, r in items:
                        groups[(r["assay_id"], r["unit"])].append((ev, r))
                    last: dict[tuple[str, int], int] = {}
                    for ev, _ in items:
                        m = ev.message
                        last[(m.topic, m.partition)] = max(last.get((m.topic, m.partition), -1), m.offset)
                    sources = [(t, p, o) for (t, p), o in last.items()]
                    for (assay, unit), group in groups.items():
                        for err in engine.readings(cid, assay, unit, [r for _, r in group], sources):
                            ev, r = group[err.index] if err.index is not None else group[0]
                            rejected.append((ev, r, err))
                        sources = []
            for ev, r, problem in rejected:
                await self.dead_letter(ev, "validate", problem, [r["reading_id"]])
            if cid in engine:
                self.tick(cid)

    async def on_plates(self, events: list[Any]) -> None:
        """One plate at a time: plate-level checks once, then the wells in a tight loop."""
        touched: set[str] = set()
        async for ev, plate in self.decoded(events, ("PlateReadout",)):
            cid = plate["campaign_id"]
            m = ev.message
            try:
                check_plate(plate, self.settings.max_plate_wells)
            except InvalidEvent as exc:
                await self.dead_letter(ev, "validate", exc, _well_ids(plate))
                continue
            async with self.locks[cid]:
                errors = self.engine.readings(cid, plate["assay_id"], plate["unit"], plate["wells"],
                                              [(m.topic, m.partition, m.offset)] if self.engine.defined(cid) else [])
            if errors:  # one dead letter for the plate, listing its bad wells
                whole = any(e.index is None for e in errors)
                bad = _well_ids(plate) if whole else [str(plate["wells"][e.index]["reading_id"]) for e in errors
                                                      if e.index is not None]
                await self.dead_letter(ev, "validate", plate_error(plate, errors), bad)
            if cid in self.engine:
                touched.add(cid)
        for cid in touched:
            self.tick(cid)

    async def on_status(self, events: list[Any]) -> None:
        touched = set()
        async for ev, r in self.decoded(events, ("RequestStatus",)):
            try:
                async with self.locks[r["campaign_id"]]:
                    self.engine.status(r)
                touched.add(r["campaign_id"])
            except LabloopError as exc:
                await self.dead_letter(ev, "validate", exc)
        for cid in touched:
            self.tick(cid)

    async def on_decisions(self, events: list[Any]) -> None:
        """People's decisions on proposed requests: an approval sends its request to the robots;
        a rejection frees a place that the campaign's next decision fills."""
        touched = set()
        async for ev, r in self.decoded(events, ("Decision",)):
            cid = r["campaign_id"]
            try:
                async with self.locks[cid]:
                    out = self.engine.decision(r, now_ms())
                    if out:
                        self.busy[cid] += 1
                if out:
                    try:
                        await self.emit(cid, out, acked=True)
                    finally:
                        self.busy[cid] -= 1
                log.info("campaign %s: %s %s by %s%s", cid, r["action"].lower(), r["request_id"], r["decided_by"],
                         f" ({r['reason']})" if r["reason"] else "")
                touched.add(cid)
            except LabloopError as exc:
                await self.dead_letter(ev, "validate", exc)
        for cid in touched:
            self.tick(cid)

    def _observe(self) -> None:
        if self.checkpoints is not None and not self.progress.changed:
            self.checkpoint_at = time.time()  # nothing changed since the last one: it is current
        self.metrics.snapshot(self.engine, self.progress.lag, self.checkpoint_at)
        n = _assigned(self.app)
        self.readiness = (n > 0, f"{n} input partition(s) assigned, {len(self.engine)} campaign(s)" if n
                          else "waiting for the consumer group to assign input partitions")
        if self.health is not None:
            self.health.tick()

    async def on_timer(self) -> None:
        """Every 2 s: expire overdue requests, refresh what ``/metrics`` and ``/readyz`` report, and
        lengthen the long-poll of a worker gone idle."""
        now = now_ms()
        self.apply_fetch_wait()
        try:
            self._observe()
        except Exception:  # metrics must never stop expiry
            log.exception("refreshing metrics failed")
        for cid in self.engine:
            async with self.locks[cid]:
                if cid in self.paused:
                    continue  # being checkpointed: expire on the next tick
                expired = self.engine.expire(cid, now)
                if expired:
                    self.busy[cid] += 1
                    self.progress.touch(cid)
            if expired:
                try:
                    await self.emit(cid, expired)
                finally:
                    self.busy[cid] -= 1
                self.tick(cid)


def _well_ids(plate: Record) -> list[str]:
    """The reading ids of a plate's wells (a plate past the well cap: the first cap's worth)."""
    wells = plate.get("wells")
    return [str(w.get("reading_id")) for w in wells[:_DEAD_LETTER_IDS_MAX] if isinstance(w, dict)] \
        if isinstance(wells, list) else []


def _assigned(app: faust.App) -> int:
    try:
        return len(app.consumer.assignment())
    except Exception:  # not started yet
        return 0


def _spans(events: list[Any]) -> dict[Any, tuple[int, int]]:
    """Per topic-partition of a micro-batch (Faust ``TP``), its first and last offsets, in one pass.
    A partition's events arrive in offset order."""
    out: dict[Any, tuple[int, int]] = {}
    for ev in events:
        m = ev.message
        tp = m.tp
        span = out.get(tp)
        out[tp] = (m.offset, m.offset) if span is None else (span[0], m.offset)
    return out


def create_app(settings: Settings, bootstrap: str, app_id: str = "labloop-worker") -> tuple[faust.App, LabloopWorker]:
    """Build the Faust app and its agents for a broker at ``bootstrap`` (``host:port[,...]``)."""
    from labloop.streams import faust_transport

    brokers = [f"{faust_transport.SCHEME}://{b.strip()}" for b in bootstrap.split(",") if b.strip()]
    app = faust.App(
        app_id, broker=brokers, broker_credentials=_credentials(settings),
        datadir=str(settings.data_dir / "faust"),  # not the current directory
        value_serializer="raw", key_serializer="raw", web_enabled=False,
        topic_allow_declare=False,  # topics are created up front from the catalogue
        topic_disable_leader=True, broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
        consumer_auto_offset_reset="earliest", producer_linger_ms=5, processing_guarantee="at_least_once",
        # A model version's predictions (a whole pool, ~100 bytes each) in a few large batches, not
        # dozens of 16 KiB ones: the durable broker stores one object per batch, and its readers
        # fetch one object per GET.
        producer_max_batch_size=1024 * 1024, producer_max_request_size=4 * 1024 * 1024, producer_compression_type="lz4",
        stream_buffer_maxsize=max(4096, settings.worker_batch * 2),
    )
    app.labloop_fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms  # type: ignore[attr-defined]  # streams.faust_transport reads it
    w = LabloopWorker(app, settings)
    n, within = settings.worker_batch, settings.worker_batch_window_s

    def agent(role: str, handler: Any) -> None:
        async def run(stream: Any) -> None:
            async for events in stream.take_events(n, within=within):
                t0 = time.perf_counter()
                batch = list(events)
                tps = _spans(batch)
                spans = [(tp.topic, tp.partition, first, last) for tp, (first, last) in tps.items()]
                w.progress.handling(spans)
                await w.guarded(handler, batch, role)
                w.progress.handled(spans)
                if role in ("readings", "plates"):
                    w.observe_lag(tps)
                w.saw_input()  # after the lag: the next fetch's long-poll reads both
                log.debug("%s: %d events in %.3fs", role, len(events), time.perf_counter() - t0)

        run.__name__ = f"on_{role}"
        app.agent(w.topics[role], name=f"labloop.{role}")(run)

    for role, handler in (("campaigns", w.on_campaigns), ("compounds", w.on_compounds), ("readings", w.on_readings),
                          ("plates", w.on_plates), ("status", w.on_status), ("decisions", w.on_decisions)):
        agent(role, handler)
    app.timer(interval=2.0)(w.on_timer)
    if settings.checkpoint_interval_s > 0:
        app.timer(interval=settings.checkpoint_interval_s)(w.checkpoint)
    return app, w



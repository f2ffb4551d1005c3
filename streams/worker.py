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
from labloop.models import FeatureSpec, ModelError, parse_many
from labloop.models.chem import featurize_mols
from labloop.models.learners import pack_rows
from labloop.models.state import dumps
from labloop.schemas import TOPICS, Codec, LabloopError
from labloop.schemas.types import Record
from labloop.streams.campaign import CampaignRuntime, Emit, PredictionWriter, Raw, Update, now_ms, unknown_campaign
from labloop.streams.checkpoint import CheckpointStore
from labloop.streams.faust_transport import set_fetch_max_wait
from labloop.streams.modelhost import ModelHost, ModelHostError, RemoteLearner
from labloop.streams.settings import Settings

__all__ = ["LabloopWorker", "create_app"]

log = logging.getLogger("labloop.worker")
SERVICE = "labloop-worker"


def _credentials(settings: Settings) -> Any:
    proto = settings.kafka_security_protocol
    ctx = None
    if proto in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username or "",
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else "",
            mechanism=settings.kafka_sasl_mechanism or "PLAIN", ssl_context=ctx)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


class LabloopWorker:
    """Campaign state and handlers; :func:`create_app` wires them to Faust agents."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.codec = Codec(registry_url=settings.schema_registry_url, registry_config=settings.registry_config())
        self.spec = FeatureSpec()
        self.campaigns: dict[str, CampaignRuntime] = {}
        self.locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # One thread each: torch already uses every core for a fit, and RDKit's batch API its own threads.
        self.model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-model")
        self.chem_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-chem")
        self.models: ModelHost | None = None  # started by start_models(); None = fits on the model thread
        self.updaters: dict[str, asyncio.Task[None]] = {}
        self.prediction_writers: dict[str, PredictionWriter] = {}
        self.sending: dict[str, asyncio.Future[None]] = {}  # per campaign: the last batch of events handed to send
        # Checkpoints: per input topic-partition, every message below the floor was handled; a campaign
        # is "busy" from deciding something (a fit, requests, expiries) until it is sent, and a paused
        # campaign starts nothing new, so its snapshot never holds a half-applied fit or an unsent request.
        self.checkpoints: CheckpointStore | None = None
        self.floors: dict[tuple[str, int], int] = {}
        self.busy: dict[str, int] = defaultdict(int)
        self.paused: set[str] = set()
        self.dirty = False  # anything handled since the last checkpoint
        self.changed: set[str] = set()  # campaigns whose state changed since their last snapshot
        # Per reading-carrying input partition: messages behind its high watermark after the last batch.
        self.lag: dict[tuple[str, int], int] = {}
        self._fetch_wait_ms = settings.kafka_fetch_max_wait_ms  # the consumer starts with it
        self.topics = {role: app.topic(t.name, key_type=bytes, value_type=bytes, partitions=t.partitions)
                       for role, t in TOPICS.items()}

    def campaign(self, campaign_id: str) -> CampaignRuntime:
        if campaign_id not in self.campaigns:
            self.campaigns[campaign_id] = CampaignRuntime(campaign_id, device=self.settings.torch_device)
        return self.campaigns[campaign_id]

    # ---- the model process ----------------------------------------------------------------
    def start_models(self, threads: int) -> None:
        """Start the model process (it imports torch meanwhile: start it early)."""
        self.models = ModelHost(threads)

    def adopt_all(self) -> None:
        """Move every defined campaign's learner into the model process (after a restore, the
        checkpointed learners move in); call before consuming."""
        for cid in self.campaigns:
            self._adopt(cid)

    def _adopt(self, campaign_id: str) -> None:
        rt = self.campaigns.get(campaign_id)
        if self.models is not None and rt is not None and rt.pool is not None \
                and not isinstance(rt.pool.learner, RemoteLearner):
            rt.pool.learner = self.models.adopt(campaign_id, rt.pool.learner)

    def _exit_if_models_died(self, exc: BaseException) -> None:
        """Without its model process a worker can neither fit nor checkpoint: exit (code 70) so that
        a replacement restores the campaigns from the last checkpoint and Kafka."""
        if self.models is not None and not self.models.alive():
            log.critical("%s; exiting so that a replacement restores the campaigns", exc)
            os._exit(70)

    def stop_models(self) -> None:
        if self.models is not None:
            self.models.close()

    # ---- output ---------------------------------------------------------------------------
    async def emit(self, campaign_id: str, events: Iterable[Emit | Raw]) -> None:
        for e in events:
            value = e.value if isinstance(e, Raw) else self.codec.encode(e.name, e.record)
            await self.topics[e.role].send(key=campaign_id.encode(), value=value)

    async def dead_letter(self, event: Any, stage: str, exc: BaseException) -> None:
        msg = event.message
        log.warning("dead letter from %s[%s]@%s (%s): %s", msg.topic, msg.partition, msg.offset, stage, exc)
        rec = {"source_topic": msg.topic, "source_partition": msg.partition, "source_offset": msg.offset,
               "source_key": msg.key if isinstance(msg.key, bytes | None) else str(msg.key).encode(),
               "stage": stage, "service": SERVICE, "error_class": type(exc).__name__,
               "error_message": str(exc)[:2000], "raw": msg.value if isinstance(msg.value, bytes) else b"",
               "event_time": now_ms()}
        await self.topics["dead_letters"].send(key=msg.topic.encode(), value=self.codec.encode("DeadLetter", rec))

    async def decoded(self, events: list[Any], expect: tuple[str, ...]) -> AsyncIterator[tuple[Any, Record]]:
        for ev in events:
            try:
                yield ev, self.codec.decode(ev.value, expect=expect).record
            except LabloopError as exc:
                await self.dead_letter(ev, "decode", exc)

    # ---- the decision step ----------------------------------------------------------------
    def tick(self, campaign_id: str) -> None:
        """Make sure the campaign's updater runs: it folds in new data, then requests what the campaign wants.

        One updater per campaign at a time; data that arrives while it fits is taken by its
        next pass, so a backlog costs one update per fit, not one per micro-batch.
        """
        self.changed.add(campaign_id)
        task = self.updaters.get(campaign_id)
        if task is None or task.done():
            self.updaters[campaign_id] = asyncio.ensure_future(self._updater(campaign_id))

    def _fit_and_encode(self, rt: CampaignRuntime, update: Update, version: int) -> tuple[
            tuple[np.ndarray, np.ndarray], list[bytes]]:
        """On the model thread: update the learner, score the pool, encode the Prediction events."""
        assert rt.pool is not None and rt.definition is not None
        pred = rt.pool.fit(update.y_new, update.keys, update.X_pool)
        writer = self.prediction_writers.setdefault(rt.campaign_id, PredictionWriter(self.codec))
        return pred, writer.encode(rt.campaign_id, rt.definition.objective_assay_id, version, rt.compound_ids,
                                   pred[0], pred[1], now_ms())

    def _send_in_order(self, campaign_id: str, events: list[Emit | Raw]) -> None:
        """Send a campaign's events after those handed over before them, without waiting here (the
        next fit starts meanwhile); the campaign stays busy, for checkpoints, until they are sent."""
        prev = self.sending.get(campaign_id)

        async def run() -> None:
            try:
                if prev is not None:
                    await asyncio.wait([prev])
                await self.emit(campaign_id, events)
            except Exception:  # never silently: the events are lost for this run, the log says which
                log.exception("sending %d event(s) of campaign %s failed", len(events), campaign_id)
            finally:
                self.busy[campaign_id] -= 1

        self.sending[campaign_id] = asyncio.ensure_future(run())

    async def _updater(self, campaign_id: str) -> None:
        rt = self.campaign(campaign_id)
        lock = self.locks[campaign_id]
        loop = asyncio.get_running_loop()
        try:
            while True:
                while campaign_id in self.paused:
                    await asyncio.sleep(0.01)
                async with lock:
                    if campaign_id in self.paused:
                        continue
                    if rt.pool is None or rt.definition is None:
                        return
                    device = str(getattr(rt.pool.learner, "device", "cpu"))
                    update = rt.take_update()
                    version = rt.pool.model_version + 1  # only this updater commits versions
                    self.busy[campaign_id] += 1
                    if update is None:
                        try:
                            out = rt.requests_now(device)
                        except BaseException:  # never leave the campaign busy: checkpoints would wait forever
                            self.busy[campaign_id] -= 1
                            raise
                        if out:
                            self.changed.add(campaign_id)
                        break
                try:
                    t0 = time.perf_counter()
                    pred, raws = await loop.run_in_executor(self.model_pool, self._fit_and_encode, rt, update, version)
                    async with lock:
                        events = rt.commit_update(update, pred, time.perf_counter() - t0, device)
                        assert rt.pool.model_version == version
                        self.changed.add(campaign_id)
                except BaseException:
                    self.busy[campaign_id] -= 1
                    raise
                self._send_in_order(campaign_id, [*events, *(Raw("predictions", r) for r in raws)])
                # A backlog: coalesce more of it into the next fit, and leave the cores to draining it.
                until = time.perf_counter() + self._pace(time.perf_counter() - t0)
                while time.perf_counter() < until and self.behind():
                    await asyncio.sleep(min(0.02, until - time.perf_counter()))
            self._send_in_order(campaign_id, list(out))
        except ModelHostError as exc:
            self._exit_if_models_died(exc)
            log.exception("model update of campaign %s failed", campaign_id)
        except Exception:  # an updater must never die silently: log with the campaign, let the next tick retry
            log.exception("model update or request step of campaign %s failed", campaign_id)

    def behind(self) -> bool:
        """Whether a readings input is more than ``backlog_messages`` behind its high watermark."""
        return max(self.lag.values(), default=0) > self.settings.backlog_messages

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
                self.lag[(tp.topic, tp.partition)] = hw - last - 1
        wait = self.fetch_wait_ms()
        if wait != self._fetch_wait_ms and set_fetch_max_wait(self.app, wait):
            log.debug("fetch long-poll now %d ms", wait)
            self._fetch_wait_ms = wait

    def fetch_wait_ms(self) -> int:
        """The consumer's long-poll for the state :meth:`behind` reports: short when live (Tansu
        holds every fetch for the whole wait, so it is the latency of an idle input), long under a
        backlog, which drained single readings about a fifth faster (README, "How the worker keeps up")."""
        s = self.settings
        return s.kafka_fetch_max_wait_backlog_ms if self.behind() else s.kafka_fetch_max_wait_ms

    # ---- checkpoints ----------------------------------------------------------------------
    def handling(self, spans: dict[Any, tuple[int, int]]) -> None:
        """A batch starts: on each of its partitions, everything below its first offset was handled."""
        for tp, (first, _) in spans.items():
            self.floors[(tp.topic, tp.partition)] = first
        self.dirty = True

    def handled(self, spans: dict[Any, tuple[int, int]]) -> None:
        """A batch is done: its partitions are handled up to its last offset."""
        for tp, (_, last) in spans.items():
            key = (tp.topic, tp.partition)
            self.floors[key] = max(self.floors[key], last + 1)

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
                    self.changed.discard(campaign_id)
                    t1 = time.perf_counter()
                    rt = self.campaigns[campaign_id]
                    learner = rt.pool.learner if rt.pool is not None else None
                    remote = learner if isinstance(learner, RemoteLearner) else None
                    # The model process's learner state is asked for now, before any later fit, and collected after.
                    pending = remote.request_state() if remote is not None else None
                    state = rt.state_dict(learner=remote is None)
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
        store = self.checkpoints
        if store is None or not (self.dirty or self.changed) or not self.campaigns:
            return
        self.dirty = False
        t0 = time.perf_counter()
        floors = dict(self.floors)  # taken first: every later snapshot holds at least this much
        # A campaign unchanged since its last snapshot keeps its file: only active campaigns are stored again.
        cids = list(self.campaigns)
        try:
            blobs = {cid: await self._snapshot(cid) for cid in cids if cid in self.changed or not store.has(cid)}
        except ModelHostError as exc:
            self._exit_if_models_died(exc)
            raise
        t1 = time.perf_counter()
        await self.app.producer.flush()
        t2 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self.chem_pool, store.write, floors, blobs, cids)
        t3 = time.perf_counter()
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
                await self.dead_letter(ev, "handler", exc)
    async def on_campaigns(self, events: list[Any]) -> None:
        touched = set()
        async for ev, r in self.decoded(events, ("Campaign",)):
            cid = r["campaign_id"]
            try:
                async with self.locks[cid]:
                    # An invalid definition changes nothing, and leaves no runtime behind for a junk id.
                    rt = self.campaigns.get(cid) or CampaignRuntime(cid, device=self.settings.torch_device)
                    rt.define(r)
                    self.campaigns[cid] = rt
                    self._adopt(cid)
                touched.add(r["campaign_id"])
                log.info("campaign %s defined", r["campaign_id"])
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
            mols, ok, errors = await loop.run_in_executor(self.chem_pool, parse_many, smiles)
            bad = set(range(len(items))) - set(ok)
            for pos, err in zip(sorted(bad), errors, strict=True):
                await self.dead_letter(items[pos][0], "validate", err)
            X = await loop.run_in_executor(self.chem_pool, featurize_mols, mols, self.spec)
            packed = await loop.run_in_executor(self.chem_pool, pack_rows, X)  # for checkpoints, off the loop
            async with self.locks[cid]:
                self.campaign(cid).add_compounds([items[i][1] for i in ok], X, packed)
            self.tick(cid)

    async def on_readings(self, events: list[Any]) -> None:
        """Single readings: decoded in one loop, applied per campaign, assay and unit in one call."""
        by_campaign: dict[str, list[tuple[Any, Record]]] = defaultdict(list)
        decode = self.codec.decode
        for ev in events:
            try:
                r = decode(ev.value, expect=("AssayReading",)).record
            except LabloopError as exc:
                await self.dead_letter(ev, "decode", exc)
                continue
            by_campaign[r["campaign_id"]].append((ev, r))
        for cid, items in by_campaign.items():
            if cid not in self.campaigns:  # a dead letter each, and no state kept for an id that may be junk
                await self._unknown_campaign(cid, [(ev, [r]) for ev, r in items])
                continue
            rejected: list[tuple[Any, LabloopError]] = []
            async with self.locks[cid]:
                rt = self.campaign(cid)
                if rt.definition is None:  # one dead letter per message, as each names its campaign
                    rejected = [(ev, e) for ev, r in items for e in rt.apply_readings(r["assay_id"], r["unit"], [r])]
                else:
                    groups: dict[tuple[str, str], list[tuple[Any, Record]]] = defaultdict(list)
                    for ev, r in items:
                        groups[(r["assay_id"], r["unit"])].append((ev, r))
                    for (assay, unit), group in groups.items():
                        for err in rt.apply_readings(assay, unit, [r for _, r in group]):
                            rejected.append((group[err.index][0] if err.index is not None else group[0][0], err))
                last: dict[tuple[str, int], int] = {}
                for ev, _ in items:
                    m = ev.message
                    last[(m.topic, m.partition)] = max(last.get((m.topic, m.partition), -1), m.offset)
                for (topic, part), off in last.items():
                    rt.processed(topic, part, off)
            for ev, problem in rejected:
                await self.dead_letter(ev, "validate", problem)
            self.tick(cid)

    async def _unknown_campaign(self, campaign_id: str, messages: list[tuple[Any, list[Record]]]) -> None:
        """Readings of a campaign this worker does not know (``(event, readings)`` per message):
        dead-lettered with the error a known but undefined campaign gives, and no runtime made,
        so junk campaign ids leave nothing behind (a recovery replay skips them too)."""
        for ev, readings in messages:
            await self.dead_letter(ev, "validate", unknown_campaign(campaign_id, readings))

    async def on_plates(self, events: list[Any]) -> None:
        """One plate at a time: plate-level checks once, then the wells in a tight loop."""
        touched: set[str] = set()
        async for ev, plate in self.decoded(events, ("PlateReadout",)):
            cid = plate["campaign_id"]
            if cid not in self.campaigns:
                await self._unknown_campaign(cid, [(ev, plate["wells"])])
                continue
            async with self.locks[cid]:
                rt = self.campaign(cid)
                errors = rt.apply_readings(plate["assay_id"], plate["unit"], plate["wells"])
                rt.processed(ev.message.topic, ev.message.partition, ev.message.offset)
            for exc in errors:
                await self.dead_letter(ev, "validate", exc)
            touched.add(cid)
        for cid in touched:
            self.tick(cid)

    async def on_status(self, events: list[Any]) -> None:
        touched = set()
        async for ev, r in self.decoded(events, ("RequestStatus",)):
            try:
                async with self.locks[r["campaign_id"]]:
                    if r["campaign_id"] not in self.campaigns:
                        raise LabloopError(f"status for unknown campaign {r['campaign_id']!r}")
                    self.campaigns[r["campaign_id"]].on_status(r)
                touched.add(r["campaign_id"])
            except LabloopError as exc:
                await self.dead_letter(ev, "validate", exc)
        for cid in touched:
            self.tick(cid)

    async def on_timer(self) -> None:
        now = now_ms()
        for cid, rt in list(self.campaigns.items()):
            async with self.locks[cid]:
                if cid in self.paused:
                    continue  # being checkpointed: expire on the next tick
                expired = rt.expire(now)
                if expired:
                    self.busy[cid] += 1
                    self.changed.add(cid)
            if expired:
                try:
                    await self.emit(cid, expired)
                finally:
                    self.busy[cid] -= 1
                self.tick(cid)


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
                w.handling(tps)
                await w.guarded(handler, batch, role)
                w.handled(tps)
                if role in ("readings", "plates"):
                    w.observe_lag(tps)
                log.debug("%s: %d events in %.3fs", role, len(events), time.perf_counter() - t0)

        run.__name__ = f"on_{role}"
        app.agent(w.topics[role], name=f"labloop.{role}")(run)

    for role, handler in (("campaigns", w.on_campaigns), ("compounds", w.on_compounds), ("readings", w.on_readings),
                          ("plates", w.on_plates), ("status", w.on_status)):
        agent(role, handler)
    app.timer(interval=2.0)(w.on_timer)
    if settings.checkpoint_interval_s > 0:
        app.timer(interval=settings.checkpoint_interval_s)(w.checkpoint)
    return app, w



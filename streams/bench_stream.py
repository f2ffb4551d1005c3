"""``labloop bench stream``: throughput and latency of the stream against the machine's own ceilings.

Every figure is measured in one run, beside its ceiling:

* plates: readings/s through the worker (decode, deduplicate, model update,
  predictions and requests out) vs a bare aiokafka consumer that drains and
  fastavro-decodes the same messages in one process;
* single readings: messages/s through the worker vs a bare Faust agent that only
  drains the topic with ``stream.take()``;
* latency from a reading's publication to the first prediction of a model that
  includes it, at a fixed offered load;
* the ClickHouse sink's rows/s vs chDB inserting the same rows as one Arrow table.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from labloop.consumers.kafka import make_consumer, make_producer
from labloop.schemas import TOPICS, Codec
from labloop.streams.campaign import now_ms
from labloop.streams.datasets import enamine10k
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import Stack
from labloop.streams.settings import Settings

__all__ = ["StreamBenchConfig", "run_stream_bench"]


@dataclass(frozen=True)
class StreamBenchConfig:
    """Sizes of the run (defaults: the issue's targets)."""

    campaigns: int = 4
    pool_per_campaign: int = 2500
    plate_readings: int = 1_000_000
    plate_size: int = 384
    single_readings: int = 60_000
    latency_rate: float = 1000.0
    latency_seconds: float = 10.0
    latency_warmup_s: float = 3.0
    latency_pool: int = 10_000
    #: linger of the readings' producer in the latency phase: labloop's publisher default
    #: (``make_producer``, as ``labloop publish`` sends). At 1 ms, readings 1 ms apart go nearly one
    #: per produce request; the wait is inside the measured latency either way.
    latency_linger_ms: int = 5
    workers: int = 1
    seed: int = 0
    phases: tuple[str, ...] = ("plates", "singles", "latency", "sink")


def _including(n_readings: list[int], n: int) -> np.ndarray:
    """Per reading ``i`` of ``n``: the index of the first model version (``n_readings`` of each,
    sorted) that includes it, ``len(n_readings)`` if none does."""
    return np.searchsorted(np.asarray(n_readings), np.arange(1, n + 1), side="left")


def _latencies(versions: list[tuple[int, float]], sent: np.ndarray) -> np.ndarray:
    """Per reading ``i`` (sent at ``sent[i]``, perf_counter s): seconds until the first of
    ``versions`` (``(n_readings, arrival time)``, sorted) that includes it; inf if none does."""
    at = np.append([t for _, t in versions], np.inf)
    return at[_including([k for k, _ in versions], sent.shape[0])] - sent


def _campaign(cid: str, pool: int, seed: int) -> dict[str, Any]:
    return CampaignSpec(cid, "bench", "u", batch_size=8, init_size=8, budget=64, min_pool_size=pool,
                        schedule="CONTINUOUS", request_ttl_s=3600.0, seed=seed).to_record(now_ms())


class _Monitor:
    """Follows model-updates (and optionally predictions) from a group that joined before the clock starts."""

    def __init__(self, stack: Stack, codec: Codec, roles: tuple[str, ...] = ("model_updates",),
                 background: bool = False) -> None:
        self.codec = codec
        self.c = make_consumer(stack.kafka_config, f"bench-{os.getpid()}-{time.monotonic_ns()}",
                               stack.settings.kafka_session_timeout_s, **{"auto.offset.reset": "latest"})
        self.c.subscribe([TOPICS[r].name for r in roles])
        deadline = time.monotonic() + 30
        while not self.c.assignment() and time.monotonic() < deadline:
            self.c.poll(0.1)
        self.updates: list[tuple[float, dict[str, Any]]] = []
        self._predictions: list[tuple[float, bytes]] = []  # decoded afterwards: the monitor must not eat the cores
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:  # consume continuously, so arrival times do not wait for the caller's next poll
            self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(self.c.consume(1000, 0.005))

    def poll(self, timeout: float = 0.2) -> None:
        """Take what arrived, for up to ``timeout`` s. Arrival times are stamped within 5 ms:
        ``consume(n, t)`` returns only when ``n`` messages or ``t`` passed, so ``t`` stays small.
        With a background consumer this only waits."""
        if self._thread is not None:
            time.sleep(timeout)
            return
        deadline = time.monotonic() + timeout
        while True:
            self._take(self.c.consume(1000, min(0.005, timeout)))
            if time.monotonic() >= deadline:
                return

    def _take(self, msgs: list[Any]) -> None:
        for m in msgs:
            v = m.value()
            if m.error() or not v:
                continue
            t = time.perf_counter()
            if m.topic() == TOPICS["predictions"].name:
                self._predictions.append((t, v))
                continue
            d = self.codec.decode(v)
            if d.name == "ModelUpdate":
                self.updates.append((t, d.record))

    def first_predictions(self) -> dict[tuple[str, int], float]:
        """When the first Prediction of each (campaign, model version) arrived (perf_counter time)."""
        first: dict[tuple[str, int], float] = {}
        for t, v in self._predictions:
            r = self.codec.decode(v).record
            first.setdefault((r["campaign_id"], r["model_version"]), t)
        return first

    def wait_readings(self, targets: dict[str, int], timeout_s: float, stack: Stack) -> float:
        """perf_counter time at which every campaign's model included its target readings."""
        reached: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        while len(reached) < len(targets) and time.monotonic() < deadline:
            self.poll()
            for t, r in list(self.updates):
                cid = r["campaign_id"]
                if cid in targets and cid not in reached and r["n_readings"] >= targets[cid]:
                    reached[cid] = t
            stack.check()
        if len(reached) < len(targets):
            last = {r["campaign_id"]: r["n_readings"] for _, r in self.updates}
            raise TimeoutError(f"worker did not catch up within {timeout_s:.0f}s: {last} of {targets}")
        return max(reached.values())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.c.close()


def _register(stack: Stack, codec: Codec, pools: dict[str, list[str]], seed: int, console: Console) -> None:
    producer = make_producer(stack.kafka_config)
    mon = make_consumer(stack.kafka_config, f"bench-ready-{time.monotonic_ns()}", stack.settings.kafka_session_timeout_s)
    mon.subscribe([TOPICS["requests"].name])
    t = now_ms()
    for cid, smiles in pools.items():
        producer.produce(TOPICS["campaigns"].name, key=cid.encode(),
                         value=codec.encode("Campaign", _campaign(cid, len(smiles), seed)))
        for i, s in enumerate(smiles):
            producer.produce(TOPICS["compounds"].name, key=cid.encode(), value=codec.encode("CompoundRegistered", {
                "campaign_id": cid, "compound_id": f"{cid}-{i}", "smiles": s, "source": "bench",
                "event_time": t, "ingest_time": t}))
            if i % 5000 == 0:
                producer.poll(0)
    producer.flush(60)
    ready: set[str] = set()
    deadline = time.monotonic() + 180
    while ready != set(pools) and time.monotonic() < deadline:
        stack.check()
        for m in mon.consume(1000, 0.3):
            v = m.value()
            if not m.error() and v:
                cid = codec.decode(v).record["campaign_id"]
                if cid in pools:
                    ready.add(cid)
    mon.close()
    producer.close()
    if ready != set(pools):
        raise TimeoutError(f"pools not featurized within 180s (ready: {sorted(ready)})")
    console.print(f"  pools registered and featurized: {len(pools)} x {len(next(iter(pools.values())))} compounds")


def _plates(codec: Codec, pools: dict[str, list[str]], n: int, size: int, rng: np.random.Generator,
            tag: str) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    out, per = [], dict.fromkeys(pools, 0)
    cids = list(pools)
    t = now_ms()
    for p in range(-(-n // size)):
        cid = cids[p % len(cids)]
        k = min(size, n - p * size)
        comp = rng.integers(0, len(pools[cid]), k)
        vals = rng.normal(0, 1, k)
        wells = [{"reading_id": f"{tag}{p}-{w}", "compound_id": f"{cid}-{comp[w]}", "well": f"W{w}",
                  "value": float(vals[w]), "qualifier": "EQ", "request_id": None} for w in range(k)]
        rec = {"plate_id": f"{tag}{p}", "campaign_id": cid, "assay_id": "bench", "unit": "u",
               "instrument_id": "bench", "event_time": t, "ingest_time": t, "wells": wells}
        out.append((cid, codec.encode("PlateReadout", rec)))
        per[cid] += k
    return out, per


def _raw_drain(bootstrap: str, topic: str, n_readings: int, codec: Codec) -> float:
    """Readings/s of a bare aiokafka consumer draining and decoding ``topic`` from the start."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> float:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
        await c.start()
        try:
            parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            got, t0 = 0, time.perf_counter()
            while got < n_readings:
                batch = await c.getmany(timeout_ms=1000, max_records=10_000)
                for msgs in batch.values():
                    for m in msgs:
                        got += len(codec.decode(m.value).record.get("wells", [1]))
                if time.perf_counter() - t0 > 300:
                    raise TimeoutError("raw drain stalled")
            return got / (time.perf_counter() - t0)
        finally:
            await c.stop()

    return asyncio.run(run())


def _faust_take(bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    """A bare Faust agent that only drains ``topic`` with ``stream.take()``: ``messages_per_s``,
    and the ``messages`` and ``seconds`` after its first batch (``first_batch`` messages)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        proc = subprocess.run([sys.executable, "-m", "labloop.streams.bench_stream", bootstrap, topic, str(n), str(out), d],
                              capture_output=True, text=True, timeout=600)
        if not out.exists():
            raise RuntimeError(f"faust take baseline failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        return dict(json.loads(out.read_text()))


def _take_main(bootstrap: str, topic: str, n: int, out: str, datadir: str) -> None:
    import faust

    app = faust.App(f"bench-take-{os.getpid()}", broker=f"kafka://{bootstrap}", value_serializer="raw",
                    web_enabled=False, topic_allow_declare=False, topic_disable_leader=True, broker_session_timeout=6,
                    consumer_auto_offset_reset="earliest", datadir=datadir)
    src = app.topic(topic, value_type=bytes)
    state = {"n": 0, "t0": 0.0, "first": 0}

    @app.agent(src)
    async def drain(stream: Any) -> None:
        # The clock starts when the first batch is handed over, so that batch (up to ``within`` worth
        # of messages, taken before the clock started) is not counted: the rate is of what followed.
        async for batch in stream.take(10_000, within=0.5):
            if not state["n"]:
                state["t0"], state["first"] = time.perf_counter(), len(batch)
            state["n"] += len(batch)
            if state["n"] >= n:
                counted, seconds = state["n"] - state["first"], time.perf_counter() - state["t0"]
                Path(out).write_text(json.dumps({"messages_per_s": counted / seconds, "messages": counted,
                                                 "seconds": seconds, "first_batch": state["first"]}))
                os._exit(0)

    from faust.worker import Worker

    Worker(app, loglevel="error", quiet=True).execute_from_commandline()


def _sink_phase(stack: Stack, codec: Codec, console: Console) -> tuple[float, float, int]:
    """Sink rows/s over everything published so far vs one Arrow insert of the readings."""

    from labloop.consumers import ClickHouseSink, connect, create_tables
    from labloop.consumers.columns import Batch
    from labloop.consumers.tables import TABLES

    with tempfile.TemporaryDirectory() as d:
        client = connect(f"chdb://{d}/chdb", "labloop")
        create_tables(client)
        sink = ClickHouseSink(client, stack.kafka_config, codec, batch_rows=stack.settings.sink_batch_rows,
                              flush_s=stack.settings.sink_flush_s, group_id=f"bench-sink-{time.monotonic_ns()}")
        sink.run(idle_exit_s=3.0)
        sink_s = sink.last_flush_at - sink.assigned_at  # from the group join (Tansu makes it ~3 s) to the last insert
        rows = sum(sink.rows_inserted.values())
        # The ceiling: the same readings rows, already columnar, in one Arrow insert.
        table = TABLES["readings"]
        b = Batch(table, "raw")
        c = make_consumer(stack.kafka_config, f"bench-raw-{time.monotonic_ns()}")
        c.subscribe([TOPICS["plates"].name])
        idle = time.monotonic()
        while not c.assignment() or time.monotonic() - idle < 3:
            if not c.assignment():
                idle = time.monotonic()
            for m in c.consume(5000, 0.3):
                v = m.value()
                if not m.error() and v:
                    idle = time.monotonic()
                    b.add(codec.decode(v).record, TOPICS["plates"].name, int(m.partition() or 0), int(m.offset() or 0))
        c.close()
        arrow = b.arrow()
        client.command("CREATE TABLE readings_raw AS readings")
        t0 = time.perf_counter()
        client.insert_arrow("readings_raw", arrow)
        raw_s = time.perf_counter() - t0
        raw_rows = arrow.num_rows
        client.close()
    console.print(f"  sink: {rows} rows in {sink_s:.1f}s; raw Arrow insert: {raw_rows} rows in {raw_s:.2f}s")
    return rows / sink_s, raw_rows / raw_s, rows


def run_stream_bench(settings: Settings, cfg: StreamBenchConfig, console: Console) -> dict[str, Any]:
    import torch

    codec = Codec()
    rng = np.random.default_rng(cfg.seed)
    smiles = enamine10k().smiles
    pools = {f"bench-{i}": smiles[i * cfg.pool_per_campaign:(i + 1) * cfg.pool_per_campaign]
             for i in range(cfg.campaigns)}
    res: dict[str, Any] = {"settings": asdict(cfg), "device": "cuda" if torch.cuda.is_available() else "cpu",
                           "cpu_count": os.cpu_count()}
    t_all = time.perf_counter()
    with Stack(settings, workers=cfg.workers, with_sink=False) as stack:
        console.print(f"  stack: broker {stack.bootstrap}, {cfg.workers} worker(s)")
        _register(stack, codec, pools, cfg.seed, console)

        mon = _Monitor(stack, codec)
        producer = make_producer(stack.kafka_config, **{"linger.ms": 20, "batch.size": 4_000_000})
        if "plates" in cfg.phases:  # 1. plates
            plates, per = _plates(codec, pools, cfg.plate_readings, cfg.plate_size, rng, "p")
            t0 = time.perf_counter()
            for cid, raw in plates:
                producer.produce(TOPICS["plates"].name, key=cid.encode(), value=raw)
                producer.poll(0)
            producer.flush(120)
            publish_s = time.perf_counter() - t0
            targets = {cid: n for cid, n in per.items()}
            t_done = mon.wait_readings(targets, 900, stack)
            res["worker_readings_per_s"] = cfg.plate_readings / (t_done - t0)
            console.print(f"  plates: {cfg.plate_readings} readings in {len(plates)} plates published in {publish_s:.1f}s, "
                          f"worker done after {t_done - t0:.1f}s")
            res["raw_readings_per_s"] = _raw_drain(stack.bootstrap, TOPICS["plates"].name, cfg.plate_readings, codec)

        if "singles" in cfg.phases:  # 2. single readings, one campaign
            cid = next(iter(pools))
            base = max([r["n_readings"] for _, r in mon.updates if r["campaign_id"] == cid], default=0)
            t = now_ms()
            singles = [codec.encode("AssayReading", {
                "reading_id": f"s{i}", "campaign_id": cid, "compound_id": f"{cid}-{int(c)}", "assay_id": "bench",
                "value": float(v), "unit": "u", "qualifier": "EQ", "request_id": None, "instrument_id": "bench",
                "event_time": t, "ingest_time": t})
                for i, (c, v) in enumerate(zip(rng.integers(0, cfg.pool_per_campaign, cfg.single_readings),
                                               rng.normal(0, 1, cfg.single_readings), strict=True))]
            t0 = time.perf_counter()
            for raw in singles:
                producer.produce(TOPICS["readings"].name, key=cid.encode(), value=raw)
                producer.poll(0)
            producer.flush(120)
            t_done = mon.wait_readings({cid: base + cfg.single_readings}, 900, stack)
            res["worker_messages_per_s"] = cfg.single_readings / (t_done - t0)
            # (seconds since publishing began, readings the model had learned, that fit's seconds): where the time went
            res["singles_progress"] = [(round(t - t0, 3), r["n_readings"] - base, round(r["train_s"], 3)) for t, r in mon.updates
                                       if r["campaign_id"] == cid and t >= t0]
            take = _faust_take(stack.bootstrap, TOPICS["readings"].name, cfg.single_readings)
            res["faust_take_messages_per_s"] = take.pop("messages_per_s")
            res["faust_take"] = take
        mon.close()

        if "latency" in cfg.phases:  # 3. latency at a fixed offered load on one large campaign
            lat_cid = "bench-latency"
            _register(stack, codec, {lat_cid: smiles[: cfg.latency_pool]}, cfg.seed, console)
            mon = _Monitor(stack, codec, ("model_updates", "predictions"), background=True)
            n = int(cfg.latency_rate * cfg.latency_seconds)
            warm = int(cfg.latency_rate * cfg.latency_warmup_s)  # steady state: the first seconds are not measured
            comp = rng.integers(0, cfg.latency_pool, warm + n)
            sent = np.zeros(warm + n)
            lat_producer = make_producer(stack.kafka_config, **{"linger.ms": cfg.latency_linger_ms})
            t0 = time.perf_counter()
            wall0 = time.time()  # the same instant on the wall clock: ModelUpdates carry wall-clock times
            for i in range(warm + n):
                due = t0 + i / cfg.latency_rate
                if i % 10 == 0:  # the monitor polls between sends; sleeping, not spinning, leaves the cores to the stack
                    mon.poll(0)
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t = now_ms()
                lat_producer.produce(TOPICS["readings"].name, key=lat_cid.encode(), value=codec.encode("AssayReading", {
                    "reading_id": f"l{i}", "campaign_id": lat_cid, "compound_id": f"{lat_cid}-{int(comp[i])}",
                    "assay_id": "bench", "value": float(rng.normal()), "unit": "u", "qualifier": "EQ", "request_id": None,
                    "instrument_id": "bench", "event_time": t, "ingest_time": t}))
                sent[i] = time.perf_counter()
                lat_producer.poll(0)
            lat_producer.flush(30)
            mon.wait_readings({lat_cid: warm + n}, 300, stack)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                mon.poll(0.2)
            first = mon.first_predictions()
            versions = sorted((r["n_readings"], first.get((lat_cid, r["model_version"]), np.inf))
                              for _, r in mon.updates if r["campaign_id"] == lat_cid and r["n_new"] > 0)
            lat = _latencies(versions, sent)
            # The same clock to each version's ModelUpdate: what the model took, apart from delivering its predictions.
            lat_u = _latencies(sorted((r["n_readings"], t) for t, r in mon.updates
                                      if r["campaign_id"] == lat_cid and r["n_new"] > 0), sent)
            res["latency_update_p50_ms"] = float(np.percentile(lat_u[warm:], 50) * 1000)
            res["latency_update_p99_ms"] = float(np.percentile(lat_u[warm:], 99) * 1000)
            res["latency_p50_ms"] = float(np.percentile(lat[warm:], 50) * 1000)
            res["latency_p99_ms"] = float(np.percentile(lat[warm:], 99) * 1000)
            res["latency_warmup_p99_ms"] = float(np.percentile(lat[:warm], 99) * 1000) if warm else None
            res["latency_model_updates"] = len(versions)
            # Where a reading's time to its ModelUpdate goes: waiting for the fit that takes it to start,
            # that fit, and the update's way to this process (from its event time, stamped after the fit).
            ups = sorted((r["n_readings"], t, t0 + r["event_time"] / 1000 - wall0, r["train_s"]) for t, r in mon.updates
                         if r["campaign_id"] == lat_cid and r["n_new"] > 0)
            idx = _including([u[0] for u in ups], warm + n)[warm:]
            ok = idx < len(ups)
            if ok.any():
                arrived, made, fit = (np.asarray([u[k] for u in ups])[idx[ok]] for k in (1, 2, 3))
                a = np.column_stack([made - fit - sent[warm:][ok], fit, arrived - made]) * 1000
                res["latency_stages_ms"] = {k: {"p50": float(np.percentile(a[:, c], 50)), "p99": float(np.percentile(a[:, c], 99))}
                                            for c, k in enumerate(("to_fit_start", "fit", "update_delivery"))}
            secs = ((sent - t0) // 1).astype(int)  # where the slow readings are: max latency per second of the run
            res["latency_max_ms_by_second"] = [round(float(lat[secs == k].max()) * 1000) for k in range(int(secs.max()) + 1)]
            fits = [(t, r["train_s"], r["n_new"]) for t, r in mon.updates if r["campaign_id"] == lat_cid and r["n_new"] > 0]
            res["latency_fit_s"] = {"mean": float(np.mean([f for _, f, _ in fits])), "max": float(np.max([f for _, f, _ in fits]))}
            res["latency_debug"] = [(round(t - t0, 3), round(f, 3), n_new) for t, f, n_new in fits]
            mon.close()
            lat_producer.close()

        producer.close()
        if "sink" in cfg.phases:  # 4. the sink over everything above
            res["sink_rows_per_s"], res["raw_insert_rows_per_s"], res["sink_rows"] = _sink_phase(stack, codec, console)
    res["wall_s"] = time.perf_counter() - t_all
    return res


def print_stream_bench(res: dict[str, Any], console: Console) -> None:
    t = Table(title=f"labloop bench stream — device {res['device']}, {res['cpu_count']} CPU(s), "
                    f"{res['settings']['workers']} worker(s)")
    for c in ("measure", "labloop", "ceiling", "ratio", "target"):
        t.add_column(c, justify="right" if c != "measure" else "left")

    def row(name: str, a: str, b: str, target: str, unit: str = "/s") -> None:
        if a not in res:
            return
        va, vb = res[a], res.get(b)
        ratio = f"{va / vb:.2f}" if vb else "-"
        t.add_row(name, f"{va:,.0f}{unit}", f"{vb:,.0f}{unit}" if vb else "-", ratio, target)

    row("plates: readings through the worker", "worker_readings_per_s", "raw_readings_per_s", ">= 50,000/s and >= 0.25x")
    row("single readings: messages through the worker", "worker_messages_per_s", "faust_take_messages_per_s", ">= 0.7x")
    if "latency_p99_ms" in res:
        t.add_row("latency p50 / p99 at a fixed load", f"{res['latency_p50_ms']:.0f} / {res['latency_p99_ms']:.0f} ms",
                  "-", "-", "p99 <= 250 ms")
    row("sink rows into ClickHouse", "sink_rows_per_s", "raw_insert_rows_per_s", ">= 0.5x")
    console.print(t)
    s = res["settings"]
    console.print(f"  ceilings: bare aiokafka drain + fastavro decode (plates); bare Faust stream.take() (singles); "
                  f"one chDB Arrow insert (sink). Load: {s['plate_readings']:,} readings in plates of {s['plate_size']} over "
                  f"{s['campaigns']} campaigns x {s['pool_per_campaign']} compounds; {s['single_readings']:,} single "
                  f"readings; {s['latency_rate']:.0f} readings/s for {s['latency_seconds']:.0f}s on a "
                  f"{s['latency_pool']:,}-compound campaign after {s['latency_warmup_s']:.0f}s of warm-up at the same rate, "
                  f"published one message per reading with a {s['latency_linger_ms']} ms producer linger. "
                  f"Phases run: {', '.join(s['phases'])}.")
    if "latency_fit_s" in res:
        console.print(f"  latency: warm-up p99 {res['latency_warmup_p99_ms'] or 0:.0f} ms; {res['latency_model_updates']} "
                      f"model updates, fit {res['latency_fit_s']['mean'] * 1000:.0f} ms mean, "
                      f"{res['latency_fit_s']['max'] * 1000:.0f} ms max.")
    if "latency_stages_ms" in res:
        console.print("  latency to the ModelUpdate, p50 / p99: " + "; ".join(
            f"{k.replace('_', ' ')} {v['p50']:.0f} / {v['p99']:.0f} ms" for k, v in res["latency_stages_ms"].items()))


if __name__ == "__main__":  # the bare Faust baseline runs in its own process
    _take_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])

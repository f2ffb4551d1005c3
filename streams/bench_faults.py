"""``labloop bench faults``: nothing lost, nothing doubled, under crashes, duplicates and poison.

On the embedded stack, a LIMS publishes readings (single ``AssayReading`` events and
``PlateReadout`` plates) to several campaigns whose closed loops run meanwhile (a
virtual lab answers their requests). While it publishes, the bench

* SIGKILLs the worker repeatedly and starts a replacement (which resumes from its
  checkpoint plus the readings after it);
* SIGKILLs the sink at a random moment, and makes its replacement kill itself during
  an insert, before it can commit the offsets;
* re-sends a share of the readings (same ``reading_id``) as duplicates;
* injects poison events, one of each failure class in turn.

The producer keeps a ledger of what the broker acknowledged. At the end, when the
stack is quiet, the ledger is compared with ClickHouse: readings lost, rows stored
twice (per table: ``count()`` minus distinct natural keys), dead letters against the
poison injected, robot executions against distinct requests, and each campaign's
model against the readings it should have learned from. A negative control runs the
same load with the sink's deduplication off and must see duplicates.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab, connect
from labloop.consumers.kafka import make_consumer, make_producer
from labloop.consumers.tables import TABLES
from labloop.schemas import TOPICS, Codec
from labloop.streams.campaign import now_ms
from labloop.streams.datasets import enamine10k
from labloop.streams.definition import CampaignSpec
from labloop.streams.runtime import Stack, free_port
from labloop.streams.settings import Settings

__all__ = ["FaultBenchConfig", "POISON_KINDS", "print_fault_bench", "run_fault_bench"]

POISON_KINDS = ("garbage_bytes", "truncated", "wrong_schema", "nan_value", "infinite_value", "unknown_compound",
                "unknown_campaign", "wrong_unit", "unknown_request", "bad_smiles")
# Natural key per table for counting duplicates (predictions: campaign, model version, compound).
_KEYS = {name: t.key for name, t in TABLES.items() if t.key} | {"predictions": ("campaign_id", "model_version",
                                                                                  "compound_id")}


@dataclass(frozen=True)
class FaultBenchConfig:
    """Load and faults of one run (defaults: the issue's numbers)."""

    readings: int = 20_000
    campaigns: int = 4
    pool_per_campaign: int = 300
    rate: float = 800.0  # readings/s offered by the LIMS
    plate_frac: float = 0.5  # share of readings published in plates, the rest as single readings
    plate_size: int = 96
    duplicate_frac: float = 0.10
    poison_frac: float = 0.01
    worker_kills: int = 4
    sink_kills: int = 1  # each: one SIGKILL at a random moment, then one during an insert
    budget: int = 24  # requests per campaign
    control: bool = True
    control_readings: int = 4_000
    quiet_s: float = 5.0  # the stack counts as settled after this long without a new row
    seed: int = 0


@dataclass
class _Ledger:
    acked: dict[str, str]  # reading_id -> campaign_id, acknowledged by the broker (good readings only)
    poison: dict[tuple[str, int, int], str]  # (topic, partition, offset) -> kind, acknowledged
    duplicates_sent: int = 0
    failed: int = 0


def _campaign(cid: str, pool: int, budget: int, seed: int) -> dict[str, Any]:
    return CampaignSpec(cid, "vina", "kcal/mol", direction="MINIMIZE", batch_size=8, init_size=8, budget=budget,
                        min_pool_size=pool, schedule="CONTINUOUS", request_ttl_s=3600.0, seed=seed).to_record(now_ms())


def _reading(rid: str, cid: str, compound: str, value: float, **over: Any) -> dict[str, Any]:
    t = now_ms()
    return {"reading_id": rid, "campaign_id": cid, "compound_id": compound, "assay_id": "vina", "value": value,
            "unit": "kcal/mol", "qualifier": "EQ", "request_id": None, "instrument_id": "lims", "event_time": t,
            "ingest_time": t, **over}


def _poison(kind: str, k: int, codec: Codec, cid: str, compound: str) -> tuple[str, bytes]:
    """One poison event of ``kind``: ``(topic role, bytes)``; each must produce exactly one dead letter."""
    rid = f"poison-{k}"
    good = _reading(rid, cid, compound, -7.0)
    if kind == "garbage_bytes":
        return "readings", b"\x00\x01not avro at all " + str(k).encode()
    if kind == "truncated":
        return "readings", codec.encode("AssayReading", good)[:-9]
    if kind == "wrong_schema":
        return "readings", codec.encode("Campaign", _campaign(f"wrong-{k}", 1, 1, 0))
    if kind == "bad_smiles":
        t = now_ms()
        return "compounds", codec.encode("CompoundRegistered", {"campaign_id": cid, "compound_id": f"bad-{k}",
                                                                "smiles": "C1CC(N", "source": "lims", "event_time": t,
                                                                "ingest_time": t})
    overrides: dict[str, dict[str, Any]] = {
        "nan_value": {"value": math.nan}, "infinite_value": {"value": math.inf},
        "unknown_compound": {"compound_id": f"nope-{k}"}, "unknown_campaign": {"campaign_id": f"ghost-{k}"},
        "wrong_unit": {"unit": "mg/mL"}, "unknown_request": {"request_id": f"no-such-request-{k}"}}
    over = overrides[kind]
    return "readings", codec.encode("AssayReading", {**good, **over})


class _Faults:
    """Kills on a schedule: the worker at even intervals, the sink at random moments and mid-insert."""

    def __init__(self, stack: Stack, cfg: FaultBenchConfig, span_s: float, rng: np.random.Generator) -> None:
        self.stack = stack
        plan: list[tuple[float, str]] = [(span_s * (i + 1) / (cfg.worker_kills + 1), "worker")
                                         for i in range(cfg.worker_kills)]
        plan += [(float(t), "sink") for t in rng.uniform(0.15 * span_s, 0.8 * span_s, cfg.sink_kills)]
        self.plan = sorted(plan)
        self.t0 = time.monotonic()
        self.kills: dict[str, int] = defaultdict(int)
        self.armed_sink = False

    def step(self) -> None:
        now = time.monotonic() - self.t0
        while self.plan and self.plan[0][0] <= now:
            _, what = self.plan.pop(0)
            if what == "worker":
                self.stack.kill("worker-0")
                self.stack.restart("worker-0")
                self.kills["worker_sigkill"] += 1
            else:
                self.stack.kill("sink")
                self.kills["sink_sigkill"] += 1
                # Its replacement SIGKILLs itself while its second insert runs, before that commit.
                self.stack.restart("sink", module="labloop.streams.faults", args=("sink", "--kill-during-insert", "2"))
                self.armed_sink = True
        sink = next(p for p in self.stack.procs if p.name == "sink")
        if self.armed_sink and sink.proc.poll() is not None:
            self.kills["sink_killed_mid_insert"] += 1
            self.stack.restart("sink", args=("sink",))
            self.armed_sink = False
        for p in self.stack.procs:  # anything else that died is a failure of the run, not a planned fault
            if p.proc.poll() is not None and not (p.name == "sink" and self.armed_sink):
                self.stack.check()

    def finish(self, timeout_s: float = 60) -> None:
        """Let an armed sink die (it needs inserts to do so), then restart it clean."""
        deadline = time.monotonic() + timeout_s
        while self.armed_sink and time.monotonic() < deadline:
            self.step()
            time.sleep(0.2)
        if self.armed_sink:  # never reached its second insert: count nothing, just restart it clean
            self.stack.restart("sink", args=("sink",))
            self.armed_sink = False


def _wait_ready(stack: Stack, codec: Codec, cids: set[str], timeout_s: float = 120) -> None:
    """Until every campaign issued its first requests: its pool is registered and featurized."""
    mon = make_consumer(stack.kafka_config, f"faults-ready-{time.monotonic_ns()}")
    mon.subscribe([TOPICS["requests"].name])
    ready: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while ready != cids and time.monotonic() < deadline:
            stack.check()
            for m in mon.consume(1000, 0.3):
                v = m.value()
                if not m.error() and v:
                    ready.add(codec.decode(v).record["campaign_id"])
    finally:
        mon.close()
    if ready != cids:
        raise TimeoutError(f"campaigns not ready within {timeout_s:.0f}s: {sorted(cids - ready)}")


def _settle(stack: Stack, faults: _Faults | None, complete: Any, quiet_s: float, timeout_s: float) -> Any:
    """Wait until ``complete(client)`` holds (everything expected has arrived), then until no table
    grows for ``quiet_s`` (late duplicates would show); on timeout, measure what is there."""
    client: Any = None
    last: tuple[int, ...] | None = None
    since = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if faults is not None:
            faults.step()
        try:
            client = client or connect(stack.analyst_url)
            counts = tuple(int(client.query(f"SELECT count() FROM {t}").result_rows[0][0]) for t in sorted(TABLES))
            if counts != last:
                last, since = counts, time.monotonic()
            elif time.monotonic() - since >= quiet_s and complete(client):
                return client
        except Exception:  # the sink (and its HTTP bridge) is restarting
            client = None
        time.sleep(0.5)
    client = connect(stack.analyst_url)
    return client


def _scenario(settings: Settings, cfg: FaultBenchConfig, dedup: bool, console: Console, faults_on: bool) -> dict[str, Any]:
    codec = Codec()
    rng = np.random.default_rng(cfg.seed)
    ds = enamine10k()
    good = [i for i, v in enumerate(ds.values) if math.isfinite(v)]
    cids = [f"faults-{i}" for i in range(cfg.campaigns)]
    pools = {cid: good[i * cfg.pool_per_campaign:(i + 1) * cfg.pool_per_campaign] for i, cid in enumerate(cids)}
    settings = settings.model_copy(update={"sink_exactly_once": dedup})
    t_all = time.perf_counter()
    with Stack(settings) as stack:
        lab = VirtualLab(RobotClient(stack.kafka_config, codec, robot_id="faults-robot",
                                     journal=settings.data_dir / "robots" / "faults-robot.journal"),
                         Oracle({ds.smiles[i]: ds.values[i] for p in pools.values() for i in p}),
                         LabConfig(latency_s=0.2, plate_size=24)).start()
        producer = make_producer(stack.kafka_config)
        ledger = _Ledger({}, {})
        t = now_ms()
        for cid, idx in pools.items():
            producer.produce(TOPICS["campaigns"].name, key=cid.encode(),
                             value=codec.encode("Campaign", _campaign(cid, len(idx), cfg.budget, cfg.seed)))
            for i in idx:
                producer.produce(TOPICS["compounds"].name, key=cid.encode(), value=codec.encode("CompoundRegistered", {
                    "campaign_id": cid, "compound_id": f"c{i}", "smiles": ds.smiles[i], "source": "lims",
                    "event_time": t, "ingest_time": t}))
        producer.flush(30)
        _wait_ready(stack, codec, set(cids))

        # The LIMS load: readings on the first half of each pool (the loop requests from the rest).
        n, size = cfg.readings, cfg.plate_size
        n_poison = round(cfg.poison_frac * n)
        events: list[tuple[str, str, bytes, list[str], str | None]] = []  # role, key, value, reading ids, poison kind
        sent: list[tuple[str, str, bytes]] = []  # single-reading encodings of every good reading, for re-sends
        i = 0
        while i < n:
            cid = cids[len(events) % len(cids)]
            half = pools[cid][: len(pools[cid]) // 2]
            k = min(size, n - i) if rng.random() < cfg.plate_frac else 1
            recs = []
            for _ in range(k):
                c = int(rng.choice(half))
                recs.append(_reading(f"lims-{cfg.seed}-{i}", cid, f"c{c}", ds.values[c] + float(rng.normal(0, 0.3))))
                sent.append((cid, recs[-1]["reading_id"], codec.encode("AssayReading", recs[-1])))
                i += 1
            if k == 1:
                events.append(("readings", cid, sent[-1][2], [recs[0]["reading_id"]], None))
            else:
                wells = [{"reading_id": r["reading_id"], "compound_id": r["compound_id"], "well": f"W{w}",
                          "value": r["value"], "qualifier": "EQ", "request_id": None} for w, r in enumerate(recs)]
                plate = {"plate_id": f"plate-{cfg.seed}-{len(events)}", "campaign_id": cid, "assay_id": "vina",
                         "unit": "kcal/mol", "instrument_id": "lims", "event_time": now_ms(), "ingest_time": now_ms(),
                         "wells": wells}
                events.append(("plates", cid, codec.encode("PlateReadout", plate), [r["reading_id"] for r in recs], None))
        # Duplicates: re-sends of acknowledged-to-be readings as single events, spread through the load.
        for j in rng.choice(len(sent), round(cfg.duplicate_frac * n), replace=False):
            cid, rid, raw = sent[int(j)]
            events.append(("readings", cid, raw, [], "duplicate"))
        for k in range(n_poison):
            cid = cids[k % len(cids)]
            kind = POISON_KINDS[k % len(POISON_KINDS)]
            role, raw = _poison(kind, k, codec, cid, f"c{pools[cid][0]}")
            key = f"ghost-{k}" if kind == "unknown_campaign" else cid
            events.append((role, key, raw, [], kind))
        order = rng.permutation(len(events))
        # Keep every re-send after its original: duplicates go to the second half of the run.
        firsts = [e for e in order if events[e][4] != "duplicate"]
        dups = [e for e in order if events[e][4] == "duplicate"]
        half_at = len(firsts) // 2
        order_l = firsts[:half_at] + sorted(firsts[half_at:] + dups, key=lambda _: rng.random())

        def delivered(ids: list[str], cid: str, kind: str | None) -> Any:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    ledger.failed += 1
                elif kind == "duplicate":
                    ledger.duplicates_sent += 1
                elif kind is not None:
                    ledger.poison[(msg.topic(), msg.partition(), msg.offset())] = kind
                else:
                    ledger.acked.update(dict.fromkeys(ids, cid))
            return cb

        span = n / cfg.rate
        faults = _Faults(stack, cfg, span, rng) if faults_on else None
        console.print(f"  {'main run' if faults_on else 'negative control'}: {n:,} readings in {len(events):,} events "
                      f"over {len(cids)} campaigns at {cfg.rate:.0f} readings/s; dedup {'on' if dedup else 'off'}")
        t0 = time.monotonic()
        done = 0
        for e in order_l:
            role, key, raw, ids, kind = events[e]
            done += max(1, len(ids))
            due = t0 + done / cfg.rate
            while time.monotonic() < due:
                producer.poll(0.005)
                if faults is not None:
                    faults.step()
            producer.produce(TOPICS[role].name, key=key.encode(), value=raw, on_delivery=delivered(ids, key, kind))
        producer.flush(60)
        if faults is not None:
            while faults.plan:
                faults.step()
                time.sleep(0.2)
            faults.finish()
        per: dict[str, int] = defaultdict(int)
        for cid in ledger.acked.values():
            per[cid] += 1

        def learned_vs_expected(q: Any) -> dict[str, int]:
            """Per campaign: readings its latest model learned from minus good LIMS and robot readings."""
            robot = dict(q("SELECT campaign_id, uniqExact(reading_id) FROM readings WHERE instrument_id != 'lims' "
                           "GROUP BY campaign_id").result_rows)
            learned = dict(q("SELECT campaign_id, max(n_readings) FROM model_updates GROUP BY campaign_id").result_rows)
            return {cid: int(learned.get(cid, 0)) - per[cid] - int(robot.get(cid, 0)) for cid in cids}

        def complete(client: Any) -> bool:
            q = client.query
            have = {r[0] for r in q("SELECT DISTINCT reading_id FROM readings").result_rows}
            n_dl = int(q("SELECT count() FROM dead_letters").result_rows[0][0])
            n_done = int(q("SELECT uniqExact(campaign_id) FROM model_updates WHERE done").result_rows[0][0])
            return (set(ledger.acked) <= have and n_dl >= len(ledger.poison) and n_done == len(cids)
                    and all(v >= 0 for v in learned_vs_expected(q).values()))

        # Settle: the sink catches up, campaigns spend their budgets, models learn every reading.
        client = _settle(stack, faults, complete, cfg.quiet_s, 240)
        lab.stop()
        q = client.query
        have = {r[0] for r in q("SELECT DISTINCT reading_id FROM readings").result_rows}
        dup_by_table = {t: int(q(f"SELECT count() - uniqExact({', '.join(k)}) FROM {t}").result_rows[0][0])
                        for t, k in _KEYS.items()}
        dls = q("SELECT source_topic, source_partition, source_offset FROM dead_letters").result_rows
        dl_sources = {(str(a), int(b), int(c)) for a, b, c in dls}
        distinct_requests = int(q("SELECT uniqExact(request_id) FROM requests").result_rows[0][0])
        model_mismatch = learned_vs_expected(q)
        done_campaigns = int(q("SELECT uniqExact(campaign_id) FROM model_updates WHERE done").result_rows[0][0])
        logs = settings.data_dir / "logs"
        worker_log = (logs / "worker-0.log").read_text(errors="replace") if (logs / "worker-0.log").exists() else ""
        res = {
            "readings_acked": len(ledger.acked), "lost": len(set(ledger.acked) - have),
            "duplicate_rows": sum(dup_by_table.values()), "duplicate_rows_by_table": dup_by_table,
            "duplicates_resent": ledger.duplicates_sent, "poison_injected": len(ledger.poison),
            "poison_by_kind": {k: sum(1 for v in ledger.poison.values() if v == k) for k in POISON_KINDS},
            "dead_letters": len(dls), "dead_letters_from_poison": len(dl_sources & set(ledger.poison)),
            "robot_executions": lab.robot.executions, "distinct_requests": distinct_requests,
            "campaigns_done": done_campaigns, "campaigns": len(cids),
            "model_readings_mismatch": model_mismatch,
            "kills": sum(faults.kills.values()) if faults else 0, "kills_by_kind": dict(faults.kills) if faults else {},
            "checkpoint_restores": worker_log.count("loaded checkpoint"),
            "produce_failures": ledger.failed, "wall_s": time.perf_counter() - t_all,
        }
        producer.close()
    return res


def run_fault_bench(settings: Settings, cfg: FaultBenchConfig, console: Console,
                    workdir: Path | None = None) -> dict[str, Any]:
    """The main run (faults, deduplication on) and, with ``cfg.control``, the negative control.

    ``workdir`` keeps each run's data (logs, ClickHouse, checkpoints) there; default: a
    temporary directory, removed afterwards."""
    res: dict[str, Any] = {"settings": asdict(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        d = workdir or Path(tmp)
        s = settings.model_copy(update={"data_dir": Path(d) / "main", "clickhouse_dsn": "",
                                        "clickhouse_http_port": free_port(), "checkpoint_interval_s": 2.0,
                                        "sink_batch_rows": 5000, "sink_flush_s": 0.3})
        res.update(_scenario(s, cfg, True, console, faults_on=True))
        if cfg.control:
            c = replace(cfg, readings=cfg.control_readings, seed=cfg.seed + 1)
            sc = s.model_copy(update={"data_dir": Path(d) / "control", "clickhouse_http_port": free_port()})
            ctl = _scenario(sc, c, False, console, faults_on=False)
            res["negative_control"] = ctl
            res["negative_control_detected"] = ctl["duplicate_rows"] > 0
        else:
            res["negative_control_detected"] = None
    res["passed"] = (res["lost"] == 0 and res["duplicate_rows"] == 0 and res["dead_letters"] == res["poison_injected"]
                     and res["dead_letters_from_poison"] == res["poison_injected"]
                     and res["robot_executions"] == res["distinct_requests"]
                     and not any(res["model_readings_mismatch"].values())
                     and res["negative_control_detected"] is not False)
    return res


def print_fault_bench(res: dict[str, Any], console: Console) -> None:
    t = Table(title="labloop bench faults")
    for c in ("measure", "value", "must be"):
        t.add_column(c, justify="left" if c == "measure" else "right")
    t.add_row("readings acknowledged by the broker", f"{res['readings_acked']:,}", "")
    t.add_row("lost (acknowledged, not in ClickHouse)", str(res["lost"]), "0")
    t.add_row("duplicate rows (count - distinct keys, all tables)", str(res["duplicate_rows"]), "0")
    t.add_row("readings re-sent as duplicates", f"{res['duplicates_resent']:,}", "")
    t.add_row("poison injected / dead letters", f"{res['poison_injected']} / {res['dead_letters']}", "equal")
    t.add_row("robot executions / distinct requests", f"{res['robot_executions']} / {res['distinct_requests']}", "equal")
    t.add_row("models off by (readings learned - expected)", str(sum(map(abs, res["model_readings_mismatch"].values()))), "0")
    t.add_row("kills", f"{res['kills']} {res['kills_by_kind']}", "")
    t.add_row("worker restores from a checkpoint", str(res["checkpoint_restores"]), "")
    ctl = res.get("negative_control")
    if ctl:
        t.add_row("negative control (dedup off): duplicate rows", str(ctl["duplicate_rows"]), "> 0")
    console.print(t)
    console.print(f"  {'[green]PASSED[/]' if res['passed'] else '[red]FAILED[/]'} in {res['wall_s']:.0f}s "
                  f"(main run); campaigns done {res['campaigns_done']}/{res['campaigns']}")


def write_report(res: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(res, indent=2, default=str))

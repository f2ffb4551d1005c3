"""The ``labloop`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from labloop.schemas import LabloopError
from labloop.streams.definition import DEFAULT_LEARNER, DEFAULT_POLICY, CampaignSpec
from labloop.streams.settings import Settings, load_settings

app = typer.Typer(help="labloop: a lab-in-the-loop for drug discovery on Kafka, Faust and ClickHouse.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
publish_app = typer.Typer(help="Publish LIMS and instrument data from CSV files.", no_args_is_help=True)
app.add_typer(publish_app, name="publish")
console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    s = load_settings()
    logging.basicConfig(level={"warn": "WARNING"}.get(s.log_level, s.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return s


def _kafka(s: Settings, role: str = "operator") -> dict[str, str]:
    """Client settings: LABLOOP_KAFKA_BOOTSTRAP, else the embedded broker of the data directory
    (the one `labloop up` runs there now, or last ran: a disk broker keeps its address), with
    ``role``'s credentials when that broker authenticates. Checked once per process
    (:func:`check_broker`): wrong credentials are a named error at once, not endless retries."""
    conf = s.kafka_config() if not s.embedded_kafka else {**s.kafka_config(role), "bootstrap.servers": _embedded(s)}
    key = (conf["bootstrap.servers"], conf.get("sasl.username", ""))
    if key not in _CHECKED:
        from labloop.consumers.kafka import check_broker

        _CHECKED[key] = check_broker(conf)
    return conf


_CHECKED: dict[tuple[str, str], str] = {}  # (bootstrap, user) -> cluster id, for this process


def _embedded(s: Settings) -> str:
    from labloop.streams.broker import BrokerIdentity
    from labloop.streams.runtime import StackLock

    bootstrap = str(StackLock(s.data_dir).info().get("bootstrap", ""))
    ident = s.data_dir / "broker" / "broker.json"
    if not bootstrap and ident.exists():
        bootstrap = f"127.0.0.1:{BrokerIdentity.load_or_create(ident).port}"
    if not bootstrap:
        raise typer.BadParameter(f"no broker: set LABLOOP_KAFKA_BOOTSTRAP, or run `labloop up` on {s.data_dir}")
    return bootstrap


def _codec(s: Settings):  # type: ignore[no-untyped-def]

    return s.codec()


def _banner(info: dict[str, object]) -> Table:
    t = Table(title="labloop is up", show_header=False)
    where = {"disk": " (embedded Tansu, log on disk: kept across restarts)", "memory": " (embedded Tansu, in memory)"}
    t.add_row("Kafka bootstrap", str(info["bootstrap"]) + (where.get(str(info.get("broker_log")), "")
                                                             if info["embedded_kafka"] else ""))
    t.add_row("ClickHouse", str(info["clickhouse"]))
    t.add_row("ClickHouse HTTP", str(info["clickhouse_http"]))
    if info.get("dashboard"):
        t.add_row("dashboard", str(info["dashboard"]))
    t.add_row("worker(s)", str(info["workers"]))
    for name, port in dict(info.get("health", {})).items():  # type: ignore[call-overload]
        t.add_row(f"{name} health", f"http://127.0.0.1:{port}/metrics  (/healthz, /readyz)")
    t.add_row("logs", str(info["logs"]))
    t.add_row("pid", f"{info['pid']} (`labloop down` stops it)")
    t.add_row("clients", f"export LABLOOP_KAFKA_BOOTSTRAP={info['bootstrap']}")
    return t


@app.command()
def up(workers: Annotated[int, typer.Option(help="Faust worker processes")] = 1,
       detach: Annotated[bool, typer.Option("--detach", help="run in the background; `labloop down` stops it")] = False,
       ) -> None:
    """Start the embedded stack (broker, topics, worker, ClickHouse sink) until Ctrl-C or SIGTERM.

    A child that dies is restarted with backoff; after repeated deaths the stack stops and says
    which child and where its log is. Children die with this process, however it dies.
    """
    from labloop.streams.runtime import RuntimeFailure, Stack, StackLock, redact

    s = _settings()
    lock = StackLock(s.data_dir)
    if detach:
        _detach(s, lock, workers)
        return
    with lock, Stack(s, workers=workers, with_dashboard=s.dashboard) as stack:
        info: dict[str, object] = {
            "bootstrap": stack.bootstrap, "embedded_kafka": stack.broker is not None,
            "broker_log": "disk" if stack.broker is not None and stack.broker.durable else "memory",
            "clickhouse": redact(s.clickhouse_target), "clickhouse_http": redact(stack.clickhouse_url),
            "workers": workers, "logs": str((s.data_dir / "logs").resolve()), "started_at": time.time(),
            "health": stack.health_ports, "dashboard": stack.dashboard_url}
        lock.publish(info)
        console.print(_banner({**info, "pid": os.getpid()}))
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop:
                for line in stack.supervise():
                    err.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        except RuntimeFailure:
            console.print("stopping: a component cannot be kept running")
            raise
        console.print("stopping...")


def _detach(s: Settings, lock: object, workers: int) -> None:
    """Start ``labloop up`` in the background, wait until it is up, print where it runs."""
    import subprocess

    from labloop.streams.runtime import RuntimeFailure, StackLock

    assert isinstance(lock, StackLock)
    if lock.held_elsewhere():
        raise RuntimeFailure(f"labloop is already running on {s.data_dir} (pid {lock.info().get('pid', '?')}); "
                             f"`labloop down` stops it")
    logs = s.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(logs / "up.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "labloop.streams.cli", "up", "--workers", str(workers)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = lock.info()
        if info.get("pid") == proc.pid:
            console.print(_banner(info))
            return
        if proc.poll() is not None:
            tail = (logs / "up.log").read_text(errors="replace")[-2000:]
            raise RuntimeFailure(f"labloop up exited with code {proc.returncode}; log {logs / 'up.log'}:\n{tail}")
        time.sleep(0.2)
    raise RuntimeFailure(f"labloop up did not come up within 180 s; log {logs / 'up.log'}")


@app.command()
def down(timeout_s: Annotated[float, typer.Option(help="wait this long for a clean stop, then SIGKILL")] = 60.0) -> None:
    """Stop the `labloop up` running on the data directory."""
    from labloop.streams.runtime import StackLock

    s = _settings()
    lock = StackLock(s.data_dir)
    if not lock.held_elsewhere():
        console.print(f"labloop is not running on {s.data_dir}")
        return
    pid = lock.info().get("pid")
    if not isinstance(pid, int):
        raise typer.BadParameter(f"{lock.info_path} names no process; stop it by hand")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while lock.held_elsewhere() and time.monotonic() < deadline:
        time.sleep(0.2)
    if lock.held_elsewhere():
        os.kill(pid, signal.SIGKILL)  # its children die with it
        console.print(f"labloop (pid {pid}) did not stop within {timeout_s:.0f} s: killed")
    else:
        console.print(f"labloop (pid {pid}) stopped")


def _probe(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return int(r.status), r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


_CAMPAIGNS_SQL = ("SELECT campaign_id, budget, requested, in_flight, measured, best_value, model_version, live_rmse, "
                  "live_coverage90, live_n, done, model_version IS NOT NULL FROM campaign_progress ORDER BY campaign_id")


@app.command()
def status() -> None:
    """One screen: the stack's components and their health, the lag, and every campaign's progress
    (requested / measured / in flight / budget, best so far, model version, live error, proposals
    awaiting approval, done).

    Exit code 0 when every component is healthy, 1 when one is not, 2 when nothing runs here.
    """
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from labloop.streams.runtime import StackLock
    from labloop.streams.sql import analyst_client

    s = _settings()
    lock = StackLock(s.data_dir)
    running = lock.held_elsewhere()
    info = lock.info() if running else {}
    comps = Table(title=f"labloop on {s.data_dir}" + ("" if running else ": not running"))
    for c in ("component", "health", "ready", "detail"):
        comps.add_column(c)
    healthy = running
    if running:
        comps.add_row("labloop up", "ok", "", f"pid {info.get('pid')}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info.get('started_at', 0))))}")
        host, _, port = str(info.get("bootstrap", "")).rpartition(":")
        from labloop.streams.procs import port_in_use

        broker_ok = host == "127.0.0.1" and port.isdigit() and port_in_use(int(port))
        if info.get("embedded_kafka"):
            comps.add_row("broker", "ok" if broker_ok else "[red]down[/]", "", f"{info.get('bootstrap')} "
                          f"(log {'on disk' if info.get('broker_log') == 'disk' else 'in memory'})")
            healthy &= broker_ok
    lag_total = 0
    for name, port in dict(info.get("health", {})).items():
        code_h, _ = _probe(int(port), "/healthz")
        code_r, why = _probe(int(port), "/readyz")
        healthy &= code_h == 200
        comps.add_row(name, "ok" if code_h == 200 else f"[red]{code_h or 'unreachable'}[/]",
                      "yes" if code_r == 200 else "[yellow]no[/]", why.strip().removeprefix("ready: ")[:80])
        code_m, text = _probe(int(port), "/metrics")
        if code_m == 200 and name.startswith("worker"):
            for fam in text_string_to_metric_families(text):
                if fam.name == "labloop_consumer_lag":
                    lag_total += int(sum(smp.value for smp in fam.samples))
    console.print(comps)
    if running:
        console.print(f"worker input lag: {lag_total:,} message(s)")
    from labloop.consumers.approval import pending_counts

    try:
        client = analyst_client(s)
        rows = client.query(_CAMPAIGNS_SQL).result_rows
        waiting = pending_counts(client)
    except Exception as exc:  # the driver's errors carry ClickHouse's message
        why = re.sub(r"//[^/@\s]+@", "//***@", str(exc))  # a server DSN's password never reaches the screen
        err.print(f"[red]cannot read the campaigns from ClickHouse:[/] {why}")
        raise typer.Exit(1 if running else 2) from None
    camps = Table(title="campaigns")
    for c in ("campaign", "state", "requested", "measured", "in flight", "budget", "best", "model", "live RMSE",
              "live 90% cover", "awaiting approval"):
        camps.add_column(c, justify="left" if c in ("campaign", "state") else "right")
    for cid, budget, req, flight, meas, best, version, rmse, cover, live_n, done, has_model in rows:
        state = "done" if done else ("waiting for approval" if waiting.get(cid) and not flight else
                                     "running" if has_model or req else "waiting for its pool")
        fmt = (lambda v: "-" if v is None else f"{v:.3g}")  # noqa: E731
        camps.add_row(cid, state, str(req or 0), str(meas if has_model else 0), str(flight or 0), str(budget),
                      fmt(best), str(version if has_model else "-"), fmt(rmse) + (f" (n={live_n})" if live_n else ""),
                      fmt(cover), str(waiting.get(cid, 0)))
    console.print(camps)
    raise typer.Exit(0 if healthy else (1 if running else 2))


@app.command(hidden=True)
def worker() -> None:
    """Run one Faust worker (started by `labloop up`)."""
    import gc

    import torch
    from faust.worker import Worker

    from labloop.streams.procs import STOP_GRACE_S, exit_after
    from labloop.streams.worker import create_app

    class _StoppingWorker(Worker):  # type: ignore[misc]
        """Faust's worker, bounded in how long a stop may take (see :data:`STOP_GRACE_S`)."""

        def _on_sigterm(self) -> None:
            exit_after(STOP_GRACE_S, "worker")
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            exit_after(STOP_GRACE_S, "worker")
            super()._on_sigint()

    s = _settings()
    # The event loop needs a core of its own; fits share the rest (2 cores here: one thread).
    fit_threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(fit_threads)
    from labloop.streams.checkpoint import CheckpointStore
    from labloop.streams.recovery import rebuild

    conf = _kafka(s)
    faust_app, w = create_app(s, conf["bootstrap.servers"])
    from labloop.consumers.health import HealthServer

    w.health = HealthServer(s.health_port, w.metrics.registry, w.ready).start()  # answers /healthz during the restore
    logging.getLogger("labloop.worker").warning("health and metrics on http://127.0.0.1:%d/metrics", w.health.port)
    group = str(faust_app.conf.id)
    cluster = _CHECKED[(conf["bootstrap.servers"], conf.get("sasl.username", ""))]
    w.checkpoints = CheckpointStore(s.data_dir / "checkpoints" / f"{group}-{s.worker_id}", cluster, group)
    if s.model_process:
        w.start_models(fit_threads)
    w.chem.start()  # its imports overlap the restore below, not the first compounds
    # A replacement worker first restores what its predecessor had applied (see streams/recovery.py).
    started = time.time()
    restored = rebuild(w.engine, _kafka(s), group, w.codec, w.spec, w.checkpoints, w.limits, s.max_plate_wells)
    # The checkpoint age /metrics reports from the start: that of the checkpoint restored, or with
    # none, of this worker's state (unsaved since it started), not no series until the first one.
    w.checkpoint_at = restored.get("checkpoint_written_at_ms", started * 1000) / 1000
    for cid in w.engine:  # the replay changed them since their snapshots: the next checkpoint re-writes them
        w.progress.touch(cid)
    w.adopt_all()
    # Objects alive now (modules, the restored campaigns) live as long as the worker: the collector
    # stops scanning them, so a full collection takes milliseconds, not ~100 ms (measured here).
    gc.collect()
    gc.freeze()
    try:
        _StoppingWorker(faust_app, loglevel=s.log_level, quiet=True).execute_from_commandline()
    finally:
        w.stop_models()


@app.command(hidden=True)
def sink() -> None:
    """Run the ClickHouse sink (started by `labloop up`); serves HTTP when ClickHouse is embedded."""
    from labloop.streams.services import run_sink

    run_sink(_settings())


@app.command()
def topics() -> None:
    """Create the catalogue's topics on the configured broker and list them."""
    from labloop.schemas import TOPICS
    from labloop.streams.runtime import ensure_topics

    s = _settings()
    created = ensure_topics(_kafka(s))
    if s.schema_registry_url:  # every version in history order, each subject BACKWARD_TRANSITIVE
        subjects = s.codec(auto_register=True).govern()
        reg = Table("subject", "versions", "compatibility")
        for subject, n in subjects.items():
            reg.add_row(subject, str(n), "BACKWARD_TRANSITIVE")
        console.print(reg)
    t = Table("topic", "carries", "key", "partitions", "retention", "table", "created now")
    for spec in TOPICS.values():
        t.add_row(spec.name, ", ".join(spec.schemas), spec.key, str(spec.partitions),
                  "forever" if spec.retention_ms < 0 else f"{spec.retention_ms // 86_400_000} d", spec.table,
                  "yes" if spec.name in created else "")
    console.print(t)


class Direction(StrEnum):
    minimize = "minimize"
    maximize = "maximize"


@app.command()
def campaign(
    campaign_id: Annotated[str, typer.Argument(help="campaign id")],
    assay: Annotated[str, typer.Option(help="objective assay id")],
    unit: Annotated[str, typer.Option(help="unit of the objective's readings")],
    direction: Annotated[Direction, typer.Option()] = Direction.maximize,
    batch_size: Annotated[int, typer.Option(min=1)] = 96,
    init_size: Annotated[int, typer.Option(min=0)] = 96,
    budget: Annotated[int, typer.Option(min=0)] = 960,
    min_pool_size: Annotated[int, typer.Option(min=0, help="wait for this many compounds")] = 0,
    policy: Annotated[str, typer.Option()] = DEFAULT_POLICY,
    learner: Annotated[str, typer.Option()] = DEFAULT_LEARNER,
    continuous: Annotated[bool, typer.Option(help="refill as results arrive instead of in rounds")] = False,
    ttl_s: Annotated[float, typer.Option(help="request expiry, seconds")] = CampaignSpec.request_ttl_s,
    seed: int = 0,
    ranges: Annotated[list[str] | None, typer.Option(
        "--range", help="ASSAY:LOW:HIGH, the plausible values of an assay's readings (repeatable); "
                        "others are dead-lettered")] = None,
    objectives: Annotated[list[str] | None, typer.Option(
        "--objective", help="a further objective ASSAY:UNIT:min|max[:WEIGHT], or a constraint ASSAY:UNIT<=BOUND "
                            "(or >=) (repeatable); requests then name every assay")] = None,
    approval: Annotated[bool, typer.Option(help="hold new requests as proposed until approved (labloop approve)")] = False,
) -> None:
    """Define (or redefine) a campaign: --assay is its first objective, --objective adds others."""
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import publish_records
    from labloop.streams.campaign import now_ms
    from labloop.streams.definition import AssayRange, Objective

    try:
        more = tuple(Objective.parse(t) for t in objectives or [])
    except ValueError as exc:
        raise typer.BadParameter(f"--objective {exc}") from None
    parsed = []
    for text in ranges or []:
        try:
            name, low, high = text.rsplit(":", 2)
            parsed.append(AssayRange(name, float(low), float(high)))
        except ValueError:
            raise typer.BadParameter(f"--range {text!r}: expected ASSAY:LOW:HIGH, e.g. ic50:0:1000") from None
    spec = CampaignSpec(campaign_id, assay, unit, direction=direction.value.upper(), batch_size=batch_size,  # type: ignore[arg-type]
                        init_size=init_size, budget=budget, min_pool_size=min_pool_size, policy=policy, learner=learner,
                        schedule="CONTINUOUS" if continuous else "ROUNDS", request_ttl_s=ttl_s, seed=seed,
                        ranges=tuple(parsed), objectives=more, approval=approval)
    s = _settings()
    publish_records(make_producer(_kafka(s)), _codec(s), "campaigns", "Campaign", iter([spec.to_record(now_ms())]))
    console.print(f"campaign {campaign_id} published")


def _report_publish(res, what: str) -> None:  # type: ignore[no-untyped-def]
    for e in res.errors[:50]:
        err.print(f"[yellow]skipped[/] {e}")
    if len(res.errors) > 50:
        err.print(f"... and {len(res.errors) - 50} more malformed rows")
    console.print(f"published {res.published} {what}; {len(res.errors)} malformed row(s) skipped")
    if res.errors:
        raise typer.Exit(1 if not res.published else 0)


@publish_app.command("compounds")
def publish_compounds(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV (optionally .gz)")],
    campaign_id: Annotated[str, typer.Option("--campaign", help="campaign to register into")],
    smiles_col: Annotated[str, typer.Option(help="column holding SMILES")] = "smiles",
    id_col: Annotated[str | None, typer.Option(help="column holding compound ids (default: hash of SMILES)")] = None,
    source: Annotated[str, typer.Option(help="recorded as the registering system")] = "lims",
) -> None:
    """Register compounds from a CSV into a campaign's pool."""
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import compound_rows, publish_records

    s = _settings()
    res = publish_records(make_producer(_kafka(s, "publisher")), _codec(s), "compounds", "CompoundRegistered",
                          compound_rows(file, campaign_id, smiles_col, id_col, source))
    _report_publish(res, "compounds")


@publish_app.command("readings")
def publish_readings(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV (optionally .gz)")],
    campaign_id: Annotated[str, typer.Option("--campaign")],
    assay: Annotated[str, typer.Option(help="assay id of every reading")],
    unit: Annotated[str, typer.Option(help="unit of every reading")],
    compound_col: Annotated[str, typer.Option(help="column with compound ids")] = "compound_id",
    smiles_col: Annotated[str | None, typer.Option(help="use SMILES (hashed like `publish compounds`) instead")] = None,
    value_col: Annotated[str, typer.Option(help="column with values; '<5' style qualifiers allowed")] = "value",
    qualifier_col: Annotated[str | None, typer.Option(help="column with = < >")] = None,
    id_col: Annotated[str | None, typer.Option(help="column with reading ids (default: derived, idempotent)")] = None,
    instrument: Annotated[str, typer.Option(help="instrument id")] = "lims-import",
) -> None:
    """Publish assay readings from a CSV."""
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import publish_records, reading_rows

    s = _settings()
    rows = reading_rows(file, campaign_id, assay, unit, compound_col, value_col, qualifier_col, id_col, instrument,
                        smiles_col)
    res = publish_records(make_producer(_kafka(s, "publisher")), _codec(s), "readings", "AssayReading", rows)
    _report_publish(res, "readings")


@app.command()
def robot(
    oracle: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="CSV of SMILES -> value (virtual lab)")],
    smiles_col: str = "smiles",
    value_col: str = "value",
    unit: Annotated[str, typer.Option(help="unit of the oracle's values; must match the campaign's")] = "",
    robot_id: str = "robot-1",
    latency_s: Annotated[float, typer.Option(help="seconds per batch")] = 0.0,
    noise_sd: float = 0.0,
    failure_rate: float = 0.0,
    plate_size: Annotated[int, typer.Option(help="wells per plate; 0 = single readings")] = 384,
    campaign: Annotated[list[str] | None, typer.Option(help="serve only this campaign (repeatable; default: all)")] = None,
    assay: Annotated[list[str] | None, typer.Option(help="serve only this assay (repeatable; default: all)")] = None,
    column: Annotated[list[str] | None, typer.Option(
        "--column", help="a multi-column oracle: ASSAY:COLUMN:UNIT[:LATENCY_S] answers ASSAY from --oracle's COLUMN "
                         "after LATENCY_S more seconds (repeatable; replaces --value-col and --unit)")] = None,
) -> None:
    """Run a robot with a virtual instrument answering requests from an oracle CSV, until Ctrl-C.

    The robot journals the request ids it took on under the data directory, so a restarted
    robot of the same id never runs a request twice.
    """
    from labloop.consumers import LabConfig, Oracle, RobotClient, VirtualLab

    s = _settings()
    journal = s.data_dir / "robots" / f"{robot_id}.journal"
    group = "labloop-robots" if not (campaign or assay) else \
        "labloop-robots-" + "-".join(sorted(campaign or ["all"]) + sorted(assay or ["all"]))  # a group per fleet
    cols: dict[str, tuple[str, str, float]] = {}
    for text in column or []:
        parts = text.split(":")
        try:
            cols[parts[0]] = (parts[1], parts[2], float(parts[3]) if len(parts) > 3 else 0.0)
            if len(parts) > 4 or not all(parts[:3]):
                raise ValueError
        except (IndexError, ValueError):
            raise typer.BadParameter(f"--column {text!r}: expected ASSAY:COLUMN:UNIT[:LATENCY_S]") from None
    if not cols and not unit:
        raise typer.BadParameter("--unit is needed (or --column for a multi-column oracle)")
    oracles = Oracle.columns_from_csv(oracle, smiles_col, {a: c for a, (c, _, _) in cols.items()}) if cols else \
        Oracle.from_csv(oracle, smiles_col, value_col)
    lab = VirtualLab(RobotClient(_kafka(s, "robot"), _codec(s), robot_id=robot_id, journal=journal, group_id=group,
                                 campaigns=set(campaign) if campaign else None, assays=set(assay) if assay else None),
                     oracles,
                     LabConfig(latency_s=latency_s, noise_sd=noise_sd, failure_rate=failure_rate, plate_size=plate_size,
                               unit=unit, units={a: u for a, (_, u, _) in cols.items()},
                               assay_latency_s={a: t for a, (_, _, t) in cols.items()}))
    console.print(f"{robot_id} waiting for requests (Ctrl-C stops)")
    try:
        lab.run()
    except KeyboardInterrupt:
        pass
    finally:
        lab.stop()
    console.print(f"{lab.robot.executions} requests executed, {lab.readings_published} readings, {lab.failed} failed")


class OutFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def sql(query: Annotated[str, typer.Argument(help="SQL for ClickHouse")],
        format: Annotated[OutFormat, typer.Option("--format", "-f")] = OutFormat.table,
        operator: Annotated[bool, typer.Option("--operator", help="as the operator (schema work); default: "
                                               "the read-only analyst")] = False) -> None:
    """Run SQL against the configured ClickHouse (embedded or server) and print the result."""
    from labloop.streams.sql import analyst_client

    s = _settings()
    client = analyst_client(s, operator=operator)
    try:
        res = client.query(query)
    except Exception as exc:  # the driver's errors carry ClickHouse's message
        err.print(f"[red]query failed:[/] {exc}")
        raise typer.Exit(2) from None
    names, rows = list(res.column_names), res.result_rows
    if format is OutFormat.csv:
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(names)
        w.writerows(rows)
    elif format is OutFormat.json:
        print(json.dumps([dict(zip(names, r, strict=True)) for r in rows], default=str, indent=1))
    else:
        t = Table(*names)
        for r in rows:
            t.add_row(*("NULL" if v is None else str(v) for v in r))
        console.print(t)


@app.command()
def roles(apply: Annotated[bool, typer.Option("--apply", help="run them on the configured ClickHouse server "
                                               "(LABLOOP_CLICKHOUSE_DSN, an account that may create roles)")] = False
          ) -> None:
    """Print (or, with --apply, create) the ClickHouse roles: the sink INSERT-only, analysts
    SELECT-only, the operator schema work; nobody deletes raw or audit rows."""
    from labloop.consumers import connect
    from labloop.consumers.roles import roles_sql

    s = _settings()
    stmts = roles_sql(s.clickhouse_database, s.clickhouse_analyst_timeout_s, cluster=s.clickhouse_cluster)
    if not apply:
        print(";\n".join(stmts) + ";")
        return
    if s.embedded_clickhouse:
        raise typer.BadParameter("chDB has no access control: the embedded HTTP interface enforces these rules "
                                 "itself; --apply is for a ClickHouse server (LABLOOP_CLICKHOUSE_DSN)")
    client = connect(s.clickhouse_target)
    for stmt in stmts:
        client.command(stmt)
    console.print(f"created {', '.join(r for r in ('labloop_sink', 'labloop_analyst', 'labloop_operator'))}")


@app.command()
def demo(
    report: Annotated[Path | None, typer.Option(help="write a JSON report here")] = None,
    plot: Annotated[Path, typer.Option(help="PNG of the trajectory")] = Path("demo_trajectory.png"),
    seed: int = 0,
    timeout_s: Annotated[float, typer.Option(help="give up after this long")] = 900.0,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run one campaign on Enamine 10k through the whole embedded stack."""
    from labloop.streams.demo import run_demo

    s = _settings()
    run_demo(s, report=report, plot=plot, seed=seed, timeout_s=timeout_s, progress=progress, console=console)


dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(topic: Annotated[str | None, typer.Option(help="source topic")] = None,
             error_class: Annotated[str | None, typer.Option(help="e.g. InvalidMolecule")] = None,
             limit: int = 50) -> None:
    """Newest dead letters with where they came from and why."""
    from labloop.streams.ops import dead_letters
    from labloop.streams.sql import analyst_client

    names, rows = dead_letters(analyst_client(_settings()), topic, error_class, limit)
    t = Table(*names, title=f"dead letters ({len(rows)} shown)")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    console.print(t)


@dlq_app.command("show")
def dlq_show(source: Annotated[str, typer.Argument(help="topic:partition:offset, as `dlq list` prints it")]) -> None:
    """One dead letter: its errors, its key and its bytes, decoded when they decode."""
    from labloop.streams.ops import DeadLetterRef, show
    from labloop.streams.sql import analyst_client

    s = _settings()
    print(json.dumps(show(analyst_client(s), _codec(s), DeadLetterRef.parse(source)), indent=1, default=str))


@dlq_app.command("replay")
def dlq_replay(sources: Annotated[list[str] | None, typer.Argument(help="topic:partition:offset ...")] = None,
               topic: Annotated[str | None, typer.Option(help="every dead letter from this topic")] = None,
               error_class: Annotated[str | None, typer.Option(help="every dead letter of this class")] = None,
               dry_run: Annotated[bool, typer.Option(help="list what would be replayed")] = False) -> None:
    """Re-publish dead letters' original bytes to their source topics (after a fix)."""
    from labloop.consumers.kafka import make_producer
    from labloop.streams.ops import DeadLetterRef, replay
    from labloop.streams.sql import analyst_client

    s = _settings()
    refs = [DeadLetterRef.parse(x) for x in sources or []]
    if not (refs or topic or error_class):
        raise typer.BadParameter("name dead letters (topic:partition:offset) or filter with --topic / --error-class")
    done = replay(analyst_client(s), make_producer(_kafka(s)), topic, error_class, refs, dry_run)
    for r in done:
        console.print(f"{'would replay' if dry_run else 'replayed'} {r.topic}:{r.partition}:{r.offset}")
    console.print(f"{len(done)} message(s) {'to replay' if dry_run else 'replayed'}")


@app.command()
def explain(request_id: Annotated[str, typer.Argument(help="the request's id")]) -> None:
    """Why a compound was requested: model version, prediction, uncertainty, policy, training readings."""
    from labloop.streams.ops import explain as explain_request
    from labloop.streams.sql import analyst_client

    e = explain_request(analyst_client(_settings()), request_id)
    r, c, m, tr = e["request"], e["campaign"], e["model"], e["training_readings"]
    console.print(f"[bold]{r['request_id']}[/]: {r['compound_id']} {r['smiles']}")
    console.print(f"  campaign {r['campaign_id']}: {c.get('direction', '?').lower()} {c.get('objective_assay_id', '?')} "
                  f"({c.get('unit', '?')}), batch {r['batch']}, priority {r['priority']}, sequence {r['sequence']}")
    if r["model_version"] == 0:
        console.print("  chosen at random: the model had no data yet (the campaign's random start)")
    else:
        console.print(f"  policy {r['policy']}: acquisition score {r['acquisition_score']:.4g}; predicted "
                      f"{r['predicted_mean']:.4g} ± {r['predicted_std']:.3g}")
        console.print(f"  model v{r['model_version']}: {m.get('learner', '?')} on {m.get('device', '?')}, "
                      f"{m.get('n_train', '?')} observations, fitted in {m.get('train_s', 0):.2f}s")
    console.print(f"  it had learned from {tr['readings']} readings of {tr['compounds']} compounds "
                  f"(offsets below {tr['watermarks'] or 'none'}); best of them:")
    for cpd, value, rid in tr["best"]:
        console.print(f"    {cpd}  {value:.4g}  ({rid})")
    for d in e["decisions"]:
        console.print(f"  {d['event_time']:%Y-%m-%d %H:%M:%S} {d['action'].lower()} by {d['decided_by']}"
                      + (f", priority {d['priority']}" if d["priority"] is not None else "")
                      + (f": {d['reason']}" if d["reason"] else ""))
    out = e["outcome"]
    console.print(f"  outcome: {', '.join(s for s, _ in out['statuses']) or 'no status yet'}"
                  + "".join(f"; measured {v:.4g} {u} ({rid})" for v, u, rid in out["readings"]))


def _decide(request_ids: list[str], action: str, by: str | None, reason: str | None, priority: int | None) -> None:
    """Publish one Decision per request (each checked against ClickHouse first; none is sent when one fails)."""
    import getpass

    from labloop.consumers.approval import ApprovalError, decision_record
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import publish_records
    from labloop.streams.campaign import now_ms
    from labloop.streams.sql import analyst_client

    s = _settings()
    client = analyst_client(s)
    who = by or getpass.getuser()
    try:
        recs = [decision_record(client, rid, action, who, now_ms(), reason, priority) for rid in request_ids]
    except ApprovalError as exc:
        raise typer.BadParameter(str(exc)) from None
    publish_records(make_producer(_kafka(s)), _codec(s), "decisions", "Decision", iter(recs))
    verb = {"APPROVE": "approved", "REJECT": "rejected", "PRIORITIZE": "reprioritized"}[action]
    for r in recs:
        console.print(f"{verb} {r['request_id']} of campaign {r['campaign_id']}"
                      + (f" (priority {priority})" if priority is not None else ""))


_BY = typer.Option("--by", help="who decides (default: your login name)")


@app.command()
def approve(request_ids: Annotated[list[str], typer.Argument(help="proposed requests' ids")],
            priority: Annotated[int | None, typer.Option(help="their priority (0 = most urgent)")] = None,
            by: Annotated[str | None, _BY] = None) -> None:
    """Approve proposed requests of an approval-gated campaign: the worker sends them to the robots."""
    _decide(request_ids, "APPROVE", by, None, priority)


@app.command()
def reject(request_ids: Annotated[list[str], typer.Argument(help="proposed requests' ids")],
           reason: Annotated[str, typer.Option(help="why (required; recorded with the decision)")],
           by: Annotated[str | None, _BY] = None) -> None:
    """Reject proposed requests: their compounds are never proposed again in that campaign, and the
    campaign proposes others in their place."""
    _decide(request_ids, "REJECT", by, reason, None)


@app.command()
def prioritize(request_id: Annotated[str, typer.Argument(help="a proposed request's id")],
               priority: Annotated[int, typer.Argument(help="0 = most urgent")],
               by: Annotated[str | None, _BY] = None) -> None:
    """Change a proposed request's priority; it stays proposed until approved or rejected."""
    _decide([request_id], "PRIORITIZE", by, None, priority)


@app.command()
def proposals(campaign: Annotated[str | None, typer.Option(help="one campaign's only")] = None) -> None:
    """The approval queue: proposed requests waiting for a decision, most urgent first."""
    from labloop.consumers.approval import pending_proposals
    from labloop.streams.sql import analyst_client

    rows = pending_proposals(analyst_client(_settings()), campaign)
    table = Table("request", "campaign", "compound", "priority", "predicted", "score", "SMILES")
    for r in rows:
        pred = "" if r["predicted_mean"] is None else f"{r['predicted_mean']:.3g} ± {r['predicted_std']:.2g}"
        table.add_row(r["request_id"], r["campaign_id"], r["compound_id"], str(r["priority"]), pred,
                      "" if r["acquisition_score"] is None else f"{r['acquisition_score']:.3g}", r["smiles"][:60])
    console.print(table)
    console.print(f"{len(rows)} proposal(s) waiting")


@app.command()
def dashboard(port: Annotated[int | None, typer.Option(help="port (default LABLOOP_DASHBOARD_PORT)")] = None,
              host: Annotated[str, typer.Option(help="address to listen on; the dashboard has no login of its own: "
                                                     "beyond loopback, put it behind an authenticating proxy")] = "127.0.0.1",
              ) -> None:
    """Serve the web dashboard: campaigns, trajectories, accuracy and the approval queue."""
    import uvicorn

    from labloop.consumers.dashboard import create_dashboard
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import publish_records
    from labloop.streams.ops import explain as explain_request
    from labloop.streams.sql import analyst_client

    s = _settings()
    producer = make_producer(_kafka(s))
    codec = _codec(s)

    def publish(rec: dict[str, object]) -> None:
        publish_records(producer, codec, "decisions", "Decision", iter([rec]))

    port = s.dashboard_port if port is None else port
    console.print(f"dashboard on http://{host}:{port}/")
    uvicorn.run(create_dashboard(lambda: analyst_client(s), publish, explain_request), host=host, port=port,
                log_level="warning")


@app.command()
def requeue(request_id: Annotated[str, typer.Argument(help="the request's id")],
            reason: Annotated[str, typer.Option(help="recorded with the status")] = "requeued by an operator") -> None:
    """Put a request back: its compound returns to the pool and its place in the budget is given back.

    The campaign requests it again later under a new request id (ids are never reused). A robot
    that still reports on the old request changes nothing; a reading it publishes is learned.
    """
    from labloop.consumers.kafka import make_producer
    from labloop.consumers.publisher import publish_records
    from labloop.streams.campaign import now_ms
    from labloop.streams.ops import request_state
    from labloop.streams.sql import analyst_client

    s = _settings()
    state = request_state(analyst_client(s), request_id)
    if state is None:
        raise typer.BadParameter(f"no request {request_id!r} in ClickHouse")
    # COMPLETED with no accepted reading (the robot's result was rejected, say): the worker keeps it in
    # flight until its TTL, and it may go back now.
    if state["status"] in ("FAILED", "EXPIRED") or (state["status"] == "COMPLETED" and state["has_result"]):
        raise typer.BadParameter(f"request {request_id!r} is {state['status']} already; only a pending one goes back")
    rec = {"request_id": request_id, "campaign_id": state["campaign_id"], "compound_id": state["compound_id"],
           "status": "EXPIRED", "robot_id": "labloop-requeue", "reason": reason, "event_time": now_ms()}
    publish_records(make_producer(_kafka(s)), _codec(s), "status", "RequestStatus", iter([rec]))
    console.print(f"request {request_id} of campaign {state['campaign_id']} put back ({state['compound_id']})")


bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("al")
def bench_al(
    dataset: Annotated[str | None, typer.Option(help="bundled pool: enamine10k")] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", exists=True, dir_okay=False, help="pool CSV (optionally .gz)")] = None,
    smiles_col: Annotated[str, typer.Option(help="SMILES column of --csv")] = "smiles",
    objective_col: Annotated[str, typer.Option(help="numeric objective column of --csv; empty = failed")] = "score",
    minimize: Annotated[bool, typer.Option("--minimize/--maximize", help="direction of the objective")] = True,
    top_k: Annotated[int, typer.Option(min=1)] = 100,
    init_frac: float = 0.01,
    batch_frac: float = 0.01,
    rounds: Annotated[int, typer.Option(min=0)] = 5,
    seeds: Annotated[int, typer.Option(min=1)] = 5,
    learner: str = DEFAULT_LEARNER,
    policy: str = DEFAULT_POLICY,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    asynchronous: Annotated[bool, typer.Option("--async", help="fixed number in flight, results one by one")] = False,
    stack: Annotated[bool, typer.Option("--stack", help="also run seed 0 through the embedded stack")] = False,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
) -> None:
    """MolPAL's active-learning protocol on any pool of SMILES with a numeric objective."""
    from labloop.streams.bench_al import ALConfig, load_csv, offline_vs_stack, print_bench, run_bench
    from labloop.streams.datasets import enamine10k, published_results

    s = _settings()
    if (dataset is None) == (csv_path is None):
        raise typer.BadParameter("give exactly one of --dataset or --csv")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("--device cuda but torch sees no CUDA device")
    cfg = ALConfig(top_k=top_k, init_frac=init_frac, batch_frac=batch_frac, rounds=rounds, seeds=seeds,
                   learner=learner, policy=policy, device=None if device == "auto" else device,
                   asynchronous=asynchronous)
    X, published = None, None
    if dataset == "enamine10k":
        ds = enamine10k()
        published = published_results() if (init_frac, batch_frac, top_k) == (0.01, 0.01, 100) else None
    elif dataset is not None:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; bundled: enamine10k")
    else:
        assert csv_path is not None
        loaded = load_csv(csv_path, smiles_col, objective_col, minimize)
        ds, X = loaded.dataset, loaded.X
        for line, why in loaded.skipped[:20]:
            err.print(f"[yellow]skipped[/] row {line}: {why}")
        if loaded.skipped:
            err.print(f"{len(loaded.skipped)} row(s) with unparseable SMILES skipped")
    n_failed = sum(1 for v in ds.values if v != v)
    console.print(f"[bold]bench al[/]: {ds.name}, pool {len(ds.smiles)} ({n_failed} without a value = failed "
                  f"experiments), {'minimize' if ds.minimize else 'maximize'}, top-{top_k}")
    res = run_bench(ds, cfg, X, console)
    print_bench(res, published, console)
    console.print(f"  wall time {res['wall_s']:.1f}s (featurization {res['featurize_s']:.1f}s)")
    if stack:
        res["stack"] = offline_vs_stack(s, ds, cfg, X, console)
    if report:
        report.write_text(json.dumps(res, indent=2))
        console.print(f"  report: {report}")


@bench_app.command("mo")
def bench_mo(
    csv_path: Annotated[Path, typer.Option("--csv", exists=True, dir_okay=False, help="pool CSV (optionally .gz)")],
    objective: Annotated[list[str], typer.Option(help="COL:min or COL:max (repeatable)")],
    smiles_col: Annotated[str, typer.Option(help="SMILES column (matched in any case)")] = "smiles",
    constraint: Annotated[list[str] | None, typer.Option(help='"COL<=X" or "COL>=X" (repeatable)')] = None,
    ref_quantile: Annotated[float, typer.Option(min=0.0, max=1.0, help="reference point: only the best 1-Q of "
                                                                      "the pool pass it (0.5 = the median)")] = 0.5,
    top_k: Annotated[int, typer.Option(min=1, help="the first non-dominated layers holding at least K compounds")] = 50,
    init_frac: float = 0.02,
    batch_frac: float = 0.02,
    rounds: Annotated[int, typer.Option(min=1)] = 5,
    seeds: Annotated[int, typer.Option(min=1)] = 3,
    beta: Annotated[float, typer.Option(min=0.0, help="ParEGO optimism: objectives scored at mean - beta*std")] = 1.0,
    diversity: Annotated[float, typer.Option(min=0.0, max=1.0, help="penalty on Tanimoto similarity to the "
                                                                    "batch's earlier picks (0 = none)")] = 0.0,
    reference: Annotated[str | None, typer.Option(help="botorch: BoTorch qNEHVI beside labloop (pip install botorch)")] = None,
    history: Annotated[bool, typer.Option(help="models first learn the CSV's partly measured rows outside the "
                                                "pool (a lab's earlier measurements); never candidates")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
) -> None:
    """The `bench al` protocol for several objectives and constraints on any CSV: hypervolume and
    Pareto layers found, beside random selection (and BoTorch with --reference botorch)."""
    from labloop.models.pareto import Constraint
    from labloop.streams.bench_mo import GAP, MOConfig, load_mo_csv, print_mo, run_mo_bench

    objs: list[tuple[str, bool]] = []
    for o in objective:
        col, _, d = o.rpartition(":")
        if d not in ("min", "max") or not col:
            raise typer.BadParameter(f"--objective {o!r}: expected COL:min or COL:max")
        objs.append((col, d == "max"))
    try:
        cons = tuple(Constraint.parse(c) for c in (constraint or []))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    ref_fn = None
    if reference == "botorch":
        from labloop.streams.bench_mo_botorch import botorch_seed

        ref_fn = botorch_seed
    elif reference is not None:
        raise typer.BadParameter(f"unknown --reference {reference!r}; known: botorch")
    cfg = MOConfig(tuple(objs), cons, ref_quantile, top_k, init_frac, batch_frac, rounds, seeds, beta=beta,
                   diversity=diversity, reference=reference, device=None if device == "auto" else device)
    cols = list(dict.fromkeys([c for c, _ in objs] + [c.column for c in cons]))
    pool = load_mo_csv(csv_path, smiles_col, cols, history=history)
    # Gaps are the normal case (the pool is the rows with every column); anything else is named.
    for line, why in sorted(sk for sk in pool.skipped if sk[1] != GAP)[:20]:
        err.print(f"[yellow]skipped[/] row {line}: {why}")
    gaps = sum(why == GAP for _, why in pool.skipped)
    console.print(f"[bold]bench mo[/]: {csv_path.name}, {len(pool.smiles)} compounds with every column "
                  f"({len(pool.skipped)} rows skipped: {gaps} with a value missing, {len(pool.skipped) - gaps} "
                  f"unreadable)"
                  + (f"; history rows per column: {pool.history_counts()}" if history else ""))
    res = run_mo_bench(pool, cfg, console, ref_fn)
    print_mo(res, console)
    if report:
        report.write_text(json.dumps(res, indent=2))
        console.print(f"  report: {report}")


@bench_app.command("stream")
def bench_stream(
    workers: Annotated[int, typer.Option(min=1, help="worker processes in one consumer group")] = 1,
    plate_readings: Annotated[int, typer.Option(min=384)] = 1_000_000,
    single_readings: Annotated[int, typer.Option(min=100)] = 60_000,
    campaigns: Annotated[int, typer.Option(min=1, max=4)] = 4,
    latency_rate: float = 1000.0,
    latency_seconds: float = 10.0,
    latency_linger_ms: Annotated[int, typer.Option(min=0, help="linger of the readings' producer in the latency phase")] = 5,
    phase: Annotated[list[str] | None, typer.Option(help="run only these phases: plates, singles, latency, sink")] = None,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
) -> None:
    """Throughput and latency of the stream on the embedded stack, beside the machine's own ceilings."""
    import tempfile

    from labloop.streams.bench_stream import StreamBenchConfig, print_stream_bench, run_stream_bench
    from labloop.streams.runtime import free_port

    s = _settings()
    unknown = set(phase or ()) - set(StreamBenchConfig.phases)
    if unknown:
        raise typer.BadParameter(f"unknown phase(s) {sorted(unknown)}; choose from {list(StreamBenchConfig.phases)}")
    with tempfile.TemporaryDirectory() as d:
        s = s.model_copy(update={"data_dir": Path(d), "clickhouse_http_port": free_port()})
        cfg = StreamBenchConfig(campaigns=campaigns, plate_readings=plate_readings, single_readings=single_readings,
                                latency_rate=latency_rate, latency_seconds=latency_seconds,
                                latency_linger_ms=latency_linger_ms, workers=workers,
                                phases=tuple(phase) if phase else StreamBenchConfig.phases)
        res = run_stream_bench(s, cfg, console)
    print_stream_bench(res, console)
    if report:
        report.write_text(json.dumps(res, indent=2))
        console.print(f"  report: {report}")


@bench_app.command("faults")
def bench_faults(
    readings: Annotated[int, typer.Option(min=100, help="readings the LIMS publishes")] = 20_000,
    campaigns: Annotated[int, typer.Option(min=1)] = 4,
    worker_kills: Annotated[int, typer.Option(min=0, help="SIGKILLs of the worker")] = 4,
    sink_kills: Annotated[int, typer.Option(min=0, help="sink faults: a SIGKILL, then a kill during an insert")] = 1,
    rate: Annotated[float, typer.Option(help="readings/s offered")] = 800.0,
    control: Annotated[bool, typer.Option(help="also run the negative control (deduplication off)")] = True,
    report: Annotated[Path | None, typer.Option(help="write the JSON report here")] = None,
    workdir: Annotated[Path | None, typer.Option(help="keep the runs' data and logs here (default: removed)")] = None,
) -> None:
    """Nothing lost, nothing doubled: crashes, duplicates and poison against a ledger of acknowledged readings."""
    from labloop.streams.bench_faults import FaultBenchConfig, print_fault_bench, run_fault_bench, write_report

    cfg = FaultBenchConfig(readings=readings, campaigns=campaigns, worker_kills=worker_kills, sink_kills=sink_kills,
                           rate=rate, control=control, control_readings=max(1000, readings // 5))
    res = run_fault_bench(_settings(), cfg, console, workdir)
    print_fault_bench(res, console)
    if report:
        write_report(res, report)
        console.print(f"  report: {report}")
    if not res["passed"]:
        raise typer.Exit(1)


def main() -> None:
    """The console script: every named error (a user's or a component's) is one line on stderr
    and exit code 2, never a traceback; a bad setting names its variable."""
    from pydantic import ValidationError

    from labloop.models import ModelError

    try:
        app()
    except (LabloopError, ModelError) as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as exc:  # from Settings: a LABLOOP_* variable or .env entry
        for e in exc.errors():
            name = "LABLOOP_" + "_".join(str(p) for p in e["loc"]).upper()
            err.print(f"[red]error:[/] setting {name}: {e['msg']}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

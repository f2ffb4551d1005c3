"""Child processes of the stack: ports, readiness, and dying with the parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labloop.schemas import LabloopError

__all__ = ["STOP_GRACE_S", "RuntimeFailure", "StopSignal", "die_with_parent", "exit_after", "free_port", "port_in_use",
           "spawn", "wait_for_port"]


class RuntimeFailure(LabloopError):
    """A component of the stack did not start or died."""


#: Seconds a worker or sink may take to stop after SIGTERM before it exits anyway. With the broker
#: gone (a host shutdown stops everything at once) Faust's and librdkafka's last commits retry
#: until the supervisor's kill 15 s later; both resume exactly from a hard stop (their checkpoints
#: and ClickHouse's stored offsets), so waiting longer buys nothing.
STOP_GRACE_S = 5.0


def exit_after(grace_s: float, what: str) -> None:
    """Arm a timer that ends this process (exit status 0) if it is still running ``grace_s``
    from now, with a log line naming ``what``. Call it when a stop begins."""

    def end() -> None:
        logging.getLogger("labloop").warning(
            "%s: still stopping %.0f s after the signal (is the broker gone?); exiting now, the next start "
            "resumes from what was stored", what, grace_s)
        logging.shutdown()
        os._exit(0)

    t = threading.Timer(grace_s, end)
    t.daemon = True
    t.start()


class StopSignal:
    """SIGTERM handled on a thread of its own, so that a stop never waits for the main thread.

    Python runs a signal handler only when the main thread next executes Python code; a main
    thread inside a long C call (a synchronous offset commit to a broker that stopped answering
    waits out the request timeout, a minute) would hold the stop back that long. Here the
    signal's number reaches a pipe (:func:`signal.set_wakeup_fd`, written by the C-level handler
    from whichever thread the kernel picks) and a daemon thread reads it: it calls what
    :meth:`arm` gave and ends the process ``grace_s`` later if it still runs (:func:`exit_after`).
    Before :meth:`arm`, while the service starts, SIGTERM ends the process at once (status 0):
    nothing has been read yet that a restart would not read again.

    Construct it on the main thread, first thing in the service. Ctrl-C keeps Python's default
    (KeyboardInterrupt in the main thread).
    """

    def __init__(self, what: str, grace_s: float = STOP_GRACE_S) -> None:
        self.what, self.grace_s = what, grace_s
        self._stop: Callable[[], None] | None = None
        self._r, w = os.pipe()
        os.set_blocking(w, False)  # the C handler must never block on it
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: None)  # a Python-level handler, so the C one writes the pipe
        threading.Thread(target=self._watch, name=f"labloop-{what}-sigterm", daemon=True).start()

    def arm(self, stop: Callable[[], None]) -> None:
        """From now on SIGTERM calls ``stop()`` (which must return quickly) and the grace timer."""
        self._stop = stop

    def _watch(self) -> None:
        while True:
            got = os.read(self._r, 64)
            if int(signal.SIGTERM) in got:
                break
        log = logging.getLogger("labloop")
        if self._stop is None:
            log.warning("%s: stopped while starting", self.what)
            logging.shutdown()
            os._exit(0)
        log.info("%s: stopping (SIGTERM)", self.what)
        exit_after(self.grace_s, self.what)
        self._stop()


_PR_SET_PDEATHSIG = 1
try:  # looked up once, here: between fork and exec a child must not load libraries (other threads may hold locks)
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def die_with_parent(parent: int) -> Any:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it dies, however it
    dies (SIGKILL included), so a killed ``labloop up`` leaves no orphans. Linux only; elsewhere
    nothing."""

    def arm() -> None:
        if _PRCTL is None:
            return
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def spawn(cmd: list[str], log_path: Path | None, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a child of the stack: its own session (a Ctrl-C reaches only the parent, which stops
    it in order), dead with its parent (:func:`die_with_parent`), stdout and stderr appended to
    ``log_path`` (None: discarded). The log file is the child's: this process closes its copy."""
    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed below, the child keeps its own
    try:
        return subprocess.Popen(cmd, env=env, stdout=out if out is not None else subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent(os.getpid()))  # noqa: PLW1509
    finally:
        if out is not None:
            out.close()


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

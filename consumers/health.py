"""Health, readiness and Prometheus metrics over HTTP, on loopback, for a long-running process.

``GET /healthz``: 200 while the process's main loop has ticked within ``stale_s`` (it is alive and
not wedged), else 503. ``GET /readyz``: 200 once the process says it is ready (connected,
assigned, caught up with its restore), else 503 with the reason. ``GET /metrics``: the registry in
Prometheus' text format. Anything else: 404. The server runs on its own thread, so a busy event
loop still answers, and says so through ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthServer", "Rate"]

log = logging.getLogger("labloop.health")


class Rate:
    """Per second, between the last two readings of a running total (0 until there are two)."""

    def __init__(self) -> None:
        self.value = 0.0
        self._prev: tuple[float, float] | None = None

    def update(self, total: float) -> float:
        now = time.monotonic()
        if self._prev is not None and now > self._prev[0]:
            self.value = max(0.0, (total - self._prev[1]) / (now - self._prev[0]))
        self._prev = (now, total)
        return self.value


class HealthServer:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` on ``127.0.0.1:port``.

    Args:
        port: the port (0 = a free one; :attr:`port` tells which).
        registry: the metrics to serve.
        ready: returns ``(ready, reason)``.
        stale_s: ``/healthz`` fails when :meth:`tick` was not called for this long.
        before_scrape: called before each ``/metrics`` answer (to refresh gauges).
    """

    def __init__(self, port: int, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
                 stale_s: float = 30.0, before_scrape: Callable[[], None] | None = None) -> None:
        self.registry, self.ready, self.stale_s, self.before_scrape = registry, ready, stale_s, before_scrape
        self._tick = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    age = time.monotonic() - server._tick
                    ok = age <= server.stale_s
                    self._reply(200 if ok else 503, f"{'ok' if ok else 'stale'}: main loop ticked {age:.1f} s ago\n")
                elif path == "/readyz":
                    try:
                        ok, why = server.ready()
                    except Exception as exc:  # a readiness check that fails says so
                        ok, why = False, f"readiness check failed: {type(exc).__name__}"
                    self._reply(200 if ok else 503, f"{'ready' if ok else 'not ready'}: {why}\n")
                elif path == "/metrics":
                    if server.before_scrape is not None:
                        try:
                            server.before_scrape()
                        except Exception:
                            log.exception("refreshing metrics failed")
                    self._reply(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, "not found: /healthz, /readyz and /metrics are served here\n")

            def _reply(self, code: int, body: str | bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass  # a scrape every few seconds is not news

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def tick(self) -> None:
        """The main loop is alive (call it from the loop, every few seconds at least)."""
        self._tick = time.monotonic()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

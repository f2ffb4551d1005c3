"""ClickHouse's HTTP interface, answered from the chDB engine the sink's process owns.

chDB lets one process open a data directory; the sink is that process, and it answers on
loopback so that ``labloop sql``, clickhouse-connect and other clients can query while it runs.
"""

from __future__ import annotations

import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from clickhouse_connect.driver.client import Client

__all__ = ["HttpBridge"]

log = logging.getLogger("labloop.sink")

_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_SKIP_PARAMS = {"query", "database", "default_format", "query_id", "session_id", "session_timeout", "user",
                "password", "compress", "decompress", "enable_http_compression", "wait_end_of_query", "send_progress_in_http_headers",
                "http_headers_progress_interval_ms", "session_check", "client_protocol_version", "output_format_arrow_string_as_string"}


class HttpBridge:
    """Answer ClickHouse's HTTP interface from the chDB engine this process owns.

    Queries only (``SELECT``, ``SHOW``, ``DESCRIBE``, DDL, ``INSERT ... SELECT``);
    an insert with a data body is refused with HTTP 501. Listens on 127.0.0.1 only.
    """

    def __init__(self, client: Client, lock: threading.Lock, port: int, database: str) -> None:
        self.client, self.lock, self.port, self.database = client, lock, port, database
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._handle(b"")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._handle(self.rfile.read(length) if length else b"")

            def _handle(self, body: bytes) -> None:
                url = urlparse(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                if url.path in ("/ping", "/"):
                    if "query" not in params and not body:
                        return self._send(200, b"Ok.\n", "text/plain")
                sql = params.get("query", "")
                if body:
                    if sql and sql.lstrip().upper().startswith("INSERT"):
                        return self._send(501, b"Code: 48. labloop's chDB bridge does not accept INSERT data bodies\n",
                                          "text/plain")
                    sql = (sql + " " + body.decode()).strip() if sql else body.decode()
                status, out, fmt = bridge.execute(sql, params)
                self._send(status, out, "text/plain; charset=UTF-8" if status != 200 else "application/octet-stream",
                           fmt)

            def _send(self, status: int, out: bytes, ctype: str, fmt: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.send_header("X-ClickHouse-Server-Display-Name", "labloop-chdb")
                self.send_header("X-ClickHouse-Timezone", "UTC")
                self.send_header("X-ClickHouse-Summary", '{"read_rows":"0","written_rows":"0"}')
                if fmt:
                    self.send_header("X-ClickHouse-Format", fmt)
                if status != 200:
                    self.send_header("X-ClickHouse-Exception-Code", "1")
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="labloop-http-bridge", daemon=True)

    def execute(self, sql: str, params: dict[str, str]) -> tuple[int, bytes, str | None]:
        sql = sql.strip().rstrip(";")
        m = _FORMAT_RE.search(sql)
        fmt = m.group(1) if m else params.get("default_format", "TabSeparated")
        if m:
            sql = sql[: m.start()].rstrip()
        settings = {k: v for k, v in params.items() if k not in _SKIP_PARAMS}
        db = params.get("database") or self.database
        try:
            with self.lock:
                prev = self.client.database
                self.client.database = db
                try:
                    out = self.client.raw_query(sql, fmt=fmt, settings=settings or None)
                finally:
                    self.client.database = prev
        except Exception as exc:  # any engine error goes back to the HTTP client, as ClickHouse does
            return 500, f"Code: 1. {exc}\n".encode(), None
        return 200, out, fmt

    def start(self) -> HttpBridge:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""ClickHouse's HTTP interface on loopback, answered from the chDB engine the sink's process owns.

chDB lets one process open a data directory; the sink is that process, and it answers on
loopback so that ``labloop sql``, clickhouse-connect and other clients can query while it runs.

Locked down, because anything on the machine can reach a loopback port:

* every request needs credentials (HTTP Basic, ``X-ClickHouse-User``/``-Key`` headers, or
  ``user``/``password`` parameters): ``analyst`` or ``operator``;
* an analyst's query runs on a chDB connection of its own (never the sink's session, so nothing
  an analyst sets reaches ingest, and a slow query does not hold inserts back) set to
  ``readonly = 1`` after its ``max_execution_time`` and ``max_memory_usage``: no DDL, DROP,
  TRUNCATE, ALTER, INSERT or OPTIMIZE, no table functions (``file``, ``url``, ``s3``,
  ``remote``...), no settings changes. The statement is checked first as well: one
  ``SELECT``/``WITH``/``SHOW``/``DESCRIBE``/``EXPLAIN``/``EXISTS`` statement, no ``INTO OUTFILE``
  (chDB writes it even when read-only), no table function that reaches outside the database;
* the operator mode, for schema work, has its own credentials and connection, and may not delete
  or rewrite rows of the append-only raw and audit tables (:mod:`labloop.consumers.roles`);
* a request carrying a foreign ``Origin`` (a web page) is refused.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from labloop.consumers.roles import AppendOnly, check_operator_query

__all__ = ["ANALYST", "OPERATOR", "HttpBridge", "QueryRefused", "check_analyst_query"]

log = logging.getLogger("labloop.sink")

ANALYST, OPERATOR = "analyst", "operator"
_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_READ_KINDS = {"SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXPLAIN", "EXISTS"}
# Table functions that reach outside the database (files, the network, other servers, programs).
_OUTSIDE = ("file", "url", "urlcluster", "s3", "s3cluster", "gcs", "azureblobstorage", "azureblobstoragecluster",
            "remote", "remotesecure", "cluster", "clusterallreplicas", "mysql", "postgresql", "mongodb", "redis",
            "sqlite", "hdfs", "hdfscluster", "jdbc", "odbc", "input", "executable", "iceberg", "icebergs3",
            "deltalake", "hudi", "fuzzjson", "fuzzquery", "loop", "ytsaurus", "arrowflight", "filecluster", "paimon")
_STRINGS = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`")
_COMMENTS = re.compile(r"--[^\n]*|#[^\n]*|/\*.*?\*/", re.DOTALL)
_FUNCTION = re.compile(r"\b(" + "|".join(_OUTSIDE) + r")\s*\(", re.IGNORECASE)


class QueryRefused(Exception):  # noqa: N818 - an HTTP answer, not a labloop error: it never leaves the bridge
    """A query an analyst may not run; the message says why."""


def check_analyst_query(sql: str) -> None:
    """Refuse what an analyst may not run (see the module's docstring).

    Raises:
        QueryRefused: naming the reason.

    >>> check_analyst_query("SELECT count() FROM readings WHERE assay_id = 'file('")
    >>> try:
    ...     check_analyst_query("TRUNCATE TABLE readings")
    ... except QueryRefused as exc:
    ...     print(exc)
    only SELECT, WITH, SHOW, DESCRIBE, EXPLAIN and EXISTS are allowed to an analyst, not TRUNCATE
    """
    bare = _COMMENTS.sub(" ", _STRINGS.sub("''", sql)).strip().rstrip(";").strip()
    if ";" in bare:
        raise QueryRefused("one statement per request")
    words = re.findall(r"[A-Za-z_]+", bare.lstrip("("))
    kind = words[0].upper() if words else ""
    if kind not in _READ_KINDS:
        raise QueryRefused(f"only SELECT, WITH, SHOW, DESCRIBE, EXPLAIN and EXISTS are allowed to an analyst, not {kind or 'that'}")
    if re.search(r"\bINTO\s+OUTFILE\b", bare, re.IGNORECASE):
        raise QueryRefused("INTO OUTFILE is not allowed to an analyst")
    m = _FUNCTION.search(bare)
    if m:
        raise QueryRefused(f"table function {m.group(1)}() reaches outside the database: not allowed to an analyst")


class _Connection:
    """One chDB connection to the data directory, used by one thread at a time."""

    def __init__(self, path: str, setup: list[str]) -> None:
        import chdb

        self.conn = chdb.connect(path)
        self.lock = threading.Lock()
        self._database: str | None = None  # the connection's current database
        for sql in setup:  # the limits first: once read-only, a connection cannot change its settings
            self.conn.query(sql)

    def query(self, sql: str, fmt: str, database: str) -> bytes:
        with self.lock:
            if database != self._database:
                self.conn.query(f"USE `{database.replace('`', '')}`")
                self._database = database
            if sql.lstrip()[:3].upper() == "USE":  # the operator switched databases itself
                self._database = None
            return bytes(self.conn.query(sql, fmt).bytes())


class HttpBridge:
    """Answer ClickHouse's HTTP interface from the chDB engine this process owns.

    Args:
        path: chDB's data directory (the sink's).
        port: loopback port.
        database: the default database.
        passwords: ``{"analyst": ..., "operator": ...}``.
        timeout_s, max_memory_bytes: limits of each analyst query.

    Queries only: an insert with a data body is refused with HTTP 501. Listens on 127.0.0.1 only.
    """

    def __init__(self, path: str, port: int, database: str, passwords: dict[str, str], timeout_s: float = 30.0,
                 max_memory_bytes: int = 2_000_000_000) -> None:
        self.port, self.database, self.passwords = port, database, dict(passwords)
        self.analyst = _Connection(path, [f"SET max_execution_time = {float(timeout_s)}",
                                          f"SET max_memory_usage = {int(max_memory_bytes)}", "SET readonly = 1"])
        self.operator = _Connection(path, [])
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
                origin = self.headers.get("Origin")
                if origin and urlparse(origin).hostname not in ("127.0.0.1", "localhost", "::1"):
                    return self._send(403, b"Code: 497. cross-origin requests are refused\n", "text/plain")
                if url.path in ("/ping", "/") and "query" not in params and not body:
                    return self._send(200, b"Ok.\n", "text/plain")
                role = bridge.authenticate(self.headers, params)
                if role is None:
                    self.close_connection = True
                    return self._send(401, b"Code: 516. Authentication failed: give the analyst's or the operator's "
                                           b"credentials\n", "text/plain", extra={"WWW-Authenticate": 'Basic realm="labloop"'})
                sql = params.get("query", "")
                if body:
                    if sql and sql.lstrip().upper().startswith("INSERT"):
                        return self._send(501, b"Code: 48. labloop's chDB bridge does not accept INSERT data bodies\n",
                                          "text/plain")
                    sql = (sql + " " + body.decode(errors="replace")).strip() if sql else body.decode(errors="replace")
                status, out, fmt = bridge.execute(sql, params, role)
                self._send(status, out, "text/plain; charset=UTF-8" if status != 200 else "application/octet-stream",
                           fmt)

            def _send(self, status: int, out: bytes, ctype: str, fmt: str | None = None,
                      extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
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

    def authenticate(self, headers: Any, params: dict[str, str]) -> str | None:
        """The role whose credentials the request carries, or None."""
        user, password = headers.get("X-ClickHouse-User"), headers.get("X-ClickHouse-Key")
        auth = headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None
        user, password = user or params.get("user"), password or params.get("password")
        want = self.passwords.get(user or "")
        if want is None or password is None or not hmac.compare_digest(want.encode(), password.encode()):
            return None
        return user

    def execute(self, sql: str, params: dict[str, str], role: str = ANALYST) -> tuple[int, bytes, str | None]:
        sql = sql.strip().rstrip(";")
        m = _FORMAT_RE.search(sql)
        fmt = m.group(1) if m else params.get("default_format", "TabSeparated")
        if m:
            sql = sql[: m.start()].rstrip()
        db = params.get("database") or self.database
        try:
            # URL parameters are not applied as settings: nothing a request sets outlives it.
            if role == OPERATOR:
                check_operator_query(sql)  # schema work, but raw and audit rows stay as written
                out = self.operator.query(sql, fmt, db)
            else:
                check_analyst_query(sql)
                out = self.analyst.query(sql, fmt, db)
        except (QueryRefused, AppendOnly) as exc:
            log.warning("refused an %s query: %s", role, exc)
            return 403, f"Code: 164. {exc}\n".encode(), None
        except Exception as exc:  # any engine error goes back to the HTTP client, as ClickHouse does
            return 500, f"Code: 1. {exc}\n".encode(), None
        return 200, out, fmt

    def start(self) -> HttpBridge:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

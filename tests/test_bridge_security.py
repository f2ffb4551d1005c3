"""The analyst HTTP interface, probed as a security review would: credentials required, read-only,
nothing that reaches outside the database, no cross-origin requests; ingest carries on."""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from labloop.consumers.bridge import QueryRefused, check_analyst_query
from labloop.consumers.kafka import make_producer
from labloop.consumers.publisher import publish_records
from labloop.streams.campaign import now_ms
from labloop.streams.runtime import Stack

REFUSED = {
    "truncate": "TRUNCATE TABLE readings",
    "alter-update": "ALTER TABLE readings UPDATE value = 42 WHERE 1",
    "insert-select": "INSERT INTO readings SELECT * FROM readings LIMIT 1",
    "drop": "DROP TABLE readings",
    "create": "CREATE TABLE forged (x Int64) ENGINE = Memory",
    "optimize": "OPTIMIZE TABLE readings FINAL",
    "delete": "DELETE FROM readings WHERE 1",
    "rename": "RENAME TABLE readings TO r2",
    "set": "SET readonly = 0",
    "settings-clause": "SELECT 1 SETTINGS readonly = 0",
    "file": "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "file-environ": "SELECT * FROM file('/proc/self/environ', 'RawBLOB')",
    "insert-into-function": "INSERT INTO FUNCTION file('/tmp/labloop-evil.pkl', 'RawBLOB', 'x String') VALUES ('x')",
    "into-outfile": "SELECT 1 INTO OUTFILE '/tmp/labloop-outfile'",
    "url": "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')",
    "url-comment": "SELECT * FROM url/**/('http://127.0.0.1:9/x', 'CSV', 'a String')",
    "s3": "SELECT * FROM s3('http://127.0.0.1:9/b/k', 'CSV', 'a String')",
    "remote": "SELECT * FROM remote('127.0.0.1:9000', system.one)",
    "executable": "SELECT * FROM executable('id', 'TSV', 'x String')",
    "two-statements": "SELECT 1; DROP TABLE readings",
}


def _http(stack: Stack, sql: str, auth: tuple[str, str] | None, origin: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{stack.clickhouse_url}/?database=labloop", data=sql.encode(), method="POST")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    if origin:
        req.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _count(stack: Stack, analyst: tuple[str, str], sql: str) -> int:
    status, out = _http(stack, sql, analyst)
    assert status == 200, out
    return int(out.strip())


@pytest.fixture(scope="module")
def creds(stack: Stack) -> dict[str, tuple[str, str]]:
    pw = stack.settings.http_passwords()
    return {"analyst": ("analyst", pw["analyst"]), "operator": ("operator", pw["operator"])}


def test_no_credentials_no_query(stack: Stack, creds: dict[str, tuple[str, str]]) -> None:
    assert _http(stack, "SELECT 1", None)[0] == 401
    assert _http(stack, "SELECT 1", ("analyst", "wrong"))[0] == 401
    assert _http(stack, "SELECT 1", ("nobody", creds["analyst"][1]))[0] == 401
    assert _http(stack, "SELECT 1", creds["analyst"]) == (200, b"1\n")
    ping = urllib.request.urlopen(f"{stack.clickhouse_url}/ping", timeout=10)
    assert ping.status == 200  # health checks need no credentials, and run nothing


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_an_analyst_cannot(kind: str, stack: Stack, creds: dict[str, tuple[str, str]]) -> None:
    t0 = time.monotonic()
    status, out = _http(stack, REFUSED[kind], creds["analyst"])
    assert status != 200, out
    assert time.monotonic() - t0 < 5  # refused at once: nothing hangs on a closed port
    assert not Path("/tmp/labloop-outfile").exists() and not Path("/tmp/labloop-evil.pkl").exists()


def test_a_foreign_page_cannot_query(stack: Stack, creds: dict[str, tuple[str, str]]) -> None:
    status, _ = _http(stack, "SELECT 1", creds["operator"], origin="https://evil.example")
    assert status == 403
    assert _http(stack, "SELECT 1", creds["analyst"], origin=f"http://127.0.0.1:{stack.settings.clickhouse_http_port}")[0] == 200


def test_the_operator_may_change_the_schema(stack: Stack, creds: dict[str, tuple[str, str]]) -> None:
    assert _http(stack, "CREATE TABLE IF NOT EXISTS operator_scratch (x Int64) ENGINE = Memory", creds["operator"])[0] == 200
    assert _http(stack, "DROP TABLE operator_scratch", creds["operator"])[0] == 200
    assert _http(stack, "CREATE TABLE analyst_scratch (x Int64) ENGINE = Memory", creds["analyst"])[0] != 200


@pytest.mark.parametrize("sql", ["DELETE FROM readings WHERE 1", "ALTER TABLE readings UPDATE value = 42 WHERE 1",
                                 "ALTER TABLE labloop.dead_letters DELETE WHERE 1", "TRUNCATE TABLE requests",
                                 "DROP TABLE IF EXISTS request_status", "ALTER TABLE readings DROP PARTITION tuple()",
                                 "RENAME TABLE campaigns TO c2", "SELECT 1; DELETE FROM compounds WHERE 1"])
def test_not_even_the_operator_rewrites_raw_or_audit_rows(sql: str, stack: Stack,
                                                          creds: dict[str, tuple[str, str]]) -> None:
    before = _count(stack, creds["analyst"], "SELECT count() FROM readings")
    status, out = _http(stack, sql, creds["operator"])
    assert status == 403 and b"append-only" in out, out
    assert _count(stack, creds["analyst"], "SELECT count() FROM readings") >= before


def test_the_operator_may_add_a_column_to_an_append_only_table(stack: Stack, creds: dict[str, tuple[str, str]]) -> None:
    status, out = _http(stack, "ALTER TABLE readings ADD COLUMN IF NOT EXISTS operator_note String DEFAULT ''",
                        creds["operator"])
    assert status == 200, out
    assert _http(stack, "ALTER TABLE readings DROP COLUMN operator_note", creds["operator"])[0] == 403


def test_after_every_attempt_the_stack_is_up_and_ingest_goes_on(stack: Stack, creds: dict[str, tuple[str, str]],
                                                                codec: Any) -> None:
    for sql in REFUSED.values():
        _http(stack, sql, creds["analyst"])
    stack.check()
    before = _count(stack, creds["analyst"], "SELECT count() FROM readings")
    t = now_ms()
    rows = iter([{"reading_id": f"after-probe-{i}", "campaign_id": "probe-ingest", "compound_id": f"c{i}",
                  "assay_id": "a", "value": float(i), "unit": "u", "qualifier": "EQ", "request_id": None,
                  "instrument_id": "probe", "event_time": t, "ingest_time": t} for i in range(50)])
    producer = make_producer(stack.kafka_config)
    publish_records(producer, codec, "readings", "AssayReading", rows)
    producer.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _count(stack, creds["analyst"], "SELECT count() FROM readings") < before + 50:
        time.sleep(0.3)
    assert _count(stack, creds["analyst"], "SELECT count() FROM readings") == before + 50


@pytest.mark.parametrize("sql", ["SELECT * FROM readings WHERE assay_id = 'file(' -- url(", "WITH 1 AS x SELECT x",
                                 "SHOW TABLES", "DESCRIBE TABLE readings", "(SELECT 1)", "EXPLAIN SELECT 1",
                                 "SELECT `file`, url_hits FROM t"])
def test_reading_queries_pass_the_check(sql: str) -> None:
    check_analyst_query(sql)


def test_the_check_sees_through_comments_case_and_spacing() -> None:
    for sql in ["select * from FILE ('/etc/passwd')", "SELECT * FROM /* x */ s3Cluster('c', 'u')",
                "-- comment\nINSERT INTO t VALUES (1)", "SELECT 1 into   outfile 'x'"]:
        with pytest.raises(QueryRefused):
            check_analyst_query(sql)
